//! Linearizability of the register workload: reads, writes and
//! compare-and-set on independent keys holding `i64` values, where a key
//! that was never written reads as `None`.
//!
//! The history is split per key and each key is checked on its own, in
//! parallel threads: linearizability is compositional, so the whole history
//! is linearizable exactly when every key's part is.
//!
//! For one key the search follows Wing and Gong's algorithm with Lowe's
//! memoization (G. Lowe, "Testing for linearizability", Concurrency and
//! Computation: Practice and Experience 29(4), 2017). The calls and
//! returns form a time-ordered linked list. The search linearizes a pending
//! call, removes it from the list and starts over, and it backtracks when it
//! meets the return of an operation it has not linearized yet. A set of
//! (linearized operations, register value) pairs already seen prunes
//! repeated work.
//!
//! Outcomes enter the model as follows:
//! - `ok`: took effect once, between invocation and completion.
//! - `fail`: never took effect, dropped. A compare-and-set that completed
//!   `fail` is dropped too, so its mismatch is not checked.
//! - `info` or no completion: may take effect once, at any time after its
//!   invocation, or never. A read with such an outcome returned nothing and
//!   is dropped.
//!
//! The time budget is shared by all keys and checked during the search. A
//! key whose search runs out of time, or whose memo reaches
//! `MEMO_LIMIT_BYTES`, is unknown, never valid.
//!
//! When a key has no linearization, or its search gave up, `classify`
//! names the anomaly from definite evidence in the key's history: an
//! impossible read, a lost write or a stale read. Its rules are documented
//! there. A key without such evidence is reported as "not linearizable"
//! with the point where the search got stuck. The verdict's summary leads
//! with the kind most keys showed and lists the others.
//! This file is longer than most because the search, the classification
//! and their tests share the per-key operation type and read best together.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::checker::{counts, Anomaly, Count, Verdict};
use crate::history::{pairs, Call, Op, OpType, Process};

pub const NAME: &str = "linearizable";

/// How many steps the search takes between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u64 = 1024;

/// Estimated memory one key's memo may use before its search gives up, so
/// a hard key fails as unknown instead of exhausting the machine's memory.
const MEMO_LIMIT_BYTES: usize = 512 << 20;

/// How many stale or impossible observations per key `classify` examines,
/// in invocation order. Naming each one looks at every observation of the key.
const MAX_CLASSIFIED: usize = 64;

/// Checks the register operations of `history` for linearizability, giving
/// up with an unknown verdict when `budget` of wall time runs out. Other
/// operations (instance creates, listings, faults) are ignored.
pub fn check(history: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let keys = match split_by_key(history) {
        Ok(keys) => keys,
        Err(error) => {
            return Verdict::unknown(NAME, Vec::new(), format!("invalid history: {error}"))
        }
    };
    let total_ops: usize = keys.values().map(|key| key.ops.len()).sum();
    let indeterminate: usize = keys.values().map(|key| key.indeterminate).sum();
    let mut counts = counts(&[
        ("ops", total_ops as u64),
        ("keys", keys.len() as u64),
        ("indeterminate", indeterminate as u64),
    ]);
    if keys.is_empty() {
        return Verdict::unknown(
            NAME,
            counts,
            "no register operations in the history".to_string(),
        );
    }

    let results = check_keys_in_parallel(&keys, deadline);
    let mut anomalies = Vec::new();
    let mut undecided = Vec::new();
    let mut out_of_memory = 0;
    for (key, result) in &results {
        match result {
            KeyResult::Linearizable => {}
            KeyResult::Undecided(limit) => {
                undecided.push(key.as_str());
                out_of_memory += usize::from(*limit == Limit::Memory);
            }
            KeyResult::Invalid(anomaly) => anomalies.push(anomaly.clone()),
        }
    }
    counts.push(Count {
        name: "keys undecided".to_string(),
        value: undecided.len() as u64,
    });
    if anomalies.is_empty() && !undecided.is_empty() {
        let reason = format!(
            "the search gave up on {} of {} keys ({}): {} ran out of the {budget:?} time budget \
             and {out_of_memory} reached the memo limit of {} MiB; the other keys are linearizable",
            undecided.len(),
            keys.len(),
            name_list(&undecided),
            undecided.len() - out_of_memory,
            MEMO_LIMIT_BYTES >> 20,
        );
        return Verdict::unknown(NAME, counts, reason);
    }
    order_by_frequency(&mut anomalies);
    Verdict::from_anomalies(NAME, counts, anomalies)
}

/// Orders anomalies by how many keys share their kind, most first, then by
/// `kind_rank`, so the summary leads with what most keys showed.
fn order_by_frequency(anomalies: &mut [Anomaly]) {
    let mut frequency: HashMap<String, usize> = HashMap::new();
    for anomaly in anomalies.iter() {
        *frequency.entry(anomaly.kind.clone()).or_default() += 1;
    }
    anomalies.sort_by_key(|anomaly| {
        (
            std::cmp::Reverse(frequency[&anomaly.kind]),
            kind_rank(&anomaly.kind),
        )
    });
}

/// Lists up to five names, then how many more there are.
fn name_list(names: &[&str]) -> String {
    let mut shown = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        shown.push_str(&format!(" and {} more", names.len() - 5));
    }
    shown
}

/// Orders anomaly kinds from the most to the least specific evidence; also
/// picks a key's kind when it shows several (see `classify`).
fn kind_rank(kind: &str) -> u8 {
    match kind {
        IMPOSSIBLE_READ => 0,
        LOST_WRITE => 1,
        STALE_READ => 2,
        _ => 3,
    }
}

const IMPOSSIBLE_READ: &str = "impossible read";
const LOST_WRITE: &str = "lost write";
const STALE_READ: &str = "stale read";
const NOT_LINEARIZABLE: &str = "not linearizable";

// ---------------------------------------------------------------------------
// Operations of one key

/// A register operation's arguments and, for a read, its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// A read that returned this value.
    Read(Option<i64>),
    Write(i64),
    /// Compare-and-set that found `from` and wrote `to`.
    Cas {
        from: i64,
        to: i64,
    },
}

impl Action {
    /// The value the register must hold for this action to take effect.
    fn observed(self) -> Option<Option<i64>> {
        match self {
            Action::Read(value) => Some(value),
            Action::Cas { from, .. } => Some(Some(from)),
            Action::Write(_) => None,
        }
    }

    /// Returns the value this action leaves in the register, if it writes.
    fn written(self) -> Option<i64> {
        match self {
            Action::Read(_) => None,
            Action::Write(value) => Some(value),
            Action::Cas { to, .. } => Some(to),
        }
    }

    fn describe(self) -> String {
        match self {
            Action::Read(value) => format!("read {}", show(value)),
            Action::Write(value) => format!("write {value}"),
            Action::Cas { from, to } => format!("cas {from}->{to}"),
        }
    }
}

/// Formats a register value; `None` is the never-written initial state.
fn show(value: Option<i64>) -> String {
    match value {
        Some(value) => value.to_string(),
        None => "nothing".to_string(),
    }
}

/// The model: applies `action` to the register, or returns `None` when it
/// cannot take effect in this state.
fn step(state: Option<i64>, action: Action) -> Option<Option<i64>> {
    match action {
        Action::Read(value) => (value == state).then_some(state),
        Action::Write(value) => Some(Some(value)),
        Action::Cas { from, to } => (state == Some(from)).then_some(Some(to)),
    }
}

/// One operation on a key, reduced to what the search needs.
#[derive(Clone, Debug)]
struct RegisterOp {
    action: Action,
    process: Process,
    /// `Op::index` of the invocation; history indices order events in time.
    invoked: u64,
    /// `Op::index` of the `ok` completion. `None` for an operation that may
    /// take effect at any time after its invocation, or never.
    returned: Option<u64>,
    /// `Op::index` of the completion of any type, for reports.
    completion: Option<u64>,
}

impl RegisterOp {
    fn is_required(&self) -> bool {
        self.returned.is_some()
    }

    /// Returns whether this operation completed before `other` was invoked.
    fn precedes(&self, other: &RegisterOp) -> bool {
        self.returned
            .is_some_and(|returned| returned < other.invoked)
    }

    fn indices(&self) -> Vec<u64> {
        std::iter::once(self.invoked)
            .chain(self.completion)
            .collect()
    }

    fn describe(&self) -> String {
        let outcome = if self.is_required() {
            ""
        } else {
            " (indeterminate)"
        };
        format!("op {} {}{outcome}", self.invoked, self.action.describe())
    }
}

/// The operations of one key, in invocation order.
#[derive(Debug, Default)]
struct KeyHistory {
    ops: Vec<RegisterOp>,
    /// Writes and compare-and-sets whose outcome is unknown.
    indeterminate: usize,
}

/// A history the checker cannot interpret.
#[derive(Debug, thiserror::Error)]
enum HistoryError {
    #[error("op {index} follows op {previous}; history indices must increase along the history")]
    IndicesOutOfOrder { previous: u64, index: u64 },
    #[error(
        "op {completion} completes op {invoked} with a different function or key; \
         the recorder must complete each invocation with the same call"
    )]
    MismatchedCompletion { invoked: u64, completion: u64 },
}

/// Groups the register operations of `history` by key, dropping those that
/// certainly had no effect and reads whose result is unknown.
fn split_by_key(history: &[Op]) -> Result<BTreeMap<String, KeyHistory>, HistoryError> {
    for window in history.windows(2) {
        if window[1].index <= window[0].index {
            return Err(HistoryError::IndicesOutOfOrder {
                previous: window[0].index,
                index: window[1].index,
            });
        }
    }

    let mut keys: BTreeMap<String, KeyHistory> = BTreeMap::new();
    for pair in pairs(history) {
        let Some((key, action)) = register_action(pair.invoke, pair.completion)? else {
            continue;
        };
        let outcome = pair.outcome();
        let reads_unknown = matches!(action, Action::Read(_)) && outcome != OpType::Ok;
        if outcome == OpType::Fail || reads_unknown {
            continue;
        }
        let entry = keys.entry(key.to_string()).or_default();
        if outcome != OpType::Ok {
            entry.indeterminate += 1;
        }
        entry.ops.push(RegisterOp {
            action,
            process: pair.invoke.process,
            invoked: pair.invoke.index,
            returned: (outcome == OpType::Ok)
                .then(|| pair.completion.map(|op| op.index))
                .flatten(),
            completion: pair.completion.map(|op| op.index),
        });
    }
    Ok(keys)
}

/// Extracts the key and action of a register call, taking a read's value
/// from its completion. Returns `None` for calls of other workloads.
fn register_action<'a>(
    invoke: &'a Op,
    completion: Option<&Op>,
) -> Result<Option<(&'a str, Action)>, HistoryError> {
    let (key, action) = match &invoke.call {
        Call::Read { key, .. } => (key, Action::Read(None)),
        Call::Write { key, value } => (key, Action::Write(*value)),
        Call::Cas { key, from, to } => (
            key,
            Action::Cas {
                from: *from,
                to: *to,
            },
        ),
        _ => return Ok(None),
    };
    let Some(completion) = completion else {
        return Ok(Some((key, action)));
    };
    let action = match (&completion.call, action) {
        (Call::Read { key: done, value }, Action::Read(_)) if done == key => Action::Read(*value),
        (Call::Write { key: done, .. }, Action::Write(_)) if done == key => action,
        (Call::Cas { key: done, .. }, Action::Cas { .. }) if done == key => action,
        _ => {
            return Err(HistoryError::MismatchedCompletion {
                invoked: invoke.index,
                completion: completion.index,
            })
        }
    };
    Ok(Some((key, action)))
}

// ---------------------------------------------------------------------------
// Checking keys in parallel

#[derive(Clone, Debug)]
enum KeyResult {
    Linearizable,
    Undecided(Limit),
    Invalid(Anomaly),
}

/// The limit that made a search give up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    Time,
    Memory,
}

/// Checks every key, spreading keys over the available cores. Returns the
/// results in key order.
fn check_keys_in_parallel(
    keys: &BTreeMap<String, KeyHistory>,
    deadline: Instant,
) -> Vec<(String, KeyResult)> {
    // The largest keys start first so one of them does not run alone at the end.
    let mut order: Vec<(&String, &KeyHistory)> = keys.iter().collect();
    order.sort_by_key(|(_, key)| std::cmp::Reverse(key.ops.len()));

    let workers = std::thread::available_parallelism()
        .map_or(1, |cores| cores.get())
        .min(order.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(order.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let position = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(name, key)) = order.get(position) else {
                    break;
                };
                let result = check_key(name, key, deadline);
                results
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((name.clone(), result));
            });
        }
    });
    let mut results = results
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    results.sort_by(|a, b| a.0.cmp(&b.0));
    results
}

/// Checks one key: the search decides, and a key without a linearization,
/// or whose search gave up, is scanned for definite anomalies.
fn check_key(name: &str, key: &KeyHistory, deadline: Instant) -> KeyResult {
    let pruned = prune_unobserved(&key.ops);
    let (stuck, limit) = match search(&pruned, deadline, MEMO_LIMIT_BYTES) {
        SearchOutcome::Linearizable => return KeyResult::Linearizable,
        SearchOutcome::GaveUp(limit) => (None, limit),
        SearchOutcome::NotLinearizable(stuck) => (Some(stuck), Limit::Time),
    };
    let evidence = classify(&key.ops);
    match (evidence, stuck) {
        (None, None) => KeyResult::Undecided(limit),
        (Some(evidence), stuck) => {
            let mut message = format!("key {name}: {}", evidence.message);
            let mut indices = evidence.indices;
            if let Some(stuck) = stuck {
                message.push_str(&format!(" {}", stuck.describe(&pruned)));
                indices.extend(stuck.indices(&pruned));
            }
            KeyResult::Invalid(Anomaly::new(evidence.kind, message, indices))
        }
        (None, Some(stuck)) => {
            let message = format!("key {name}: {}", stuck.describe(&pruned));
            KeyResult::Invalid(Anomaly::new(
                NOT_LINEARIZABLE,
                message,
                stuck.indices(&pruned),
            ))
        }
    }
}

/// Drops indeterminate writes whose value no op observed.
///
/// Such a write is never needed to explain the history. If a linearization
/// applies it, the next operation that touches the register after it must
/// be a write, because no read returned its value and no compare-and-set
/// expected it. So the linearization without it is legal too. Dropping these keeps
/// the search from trying every subset of writes that timed out.
fn prune_unobserved(ops: &[RegisterOp]) -> Vec<RegisterOp> {
    let observed: HashSet<Option<i64>> = ops.iter().filter_map(|op| op.action.observed()).collect();
    ops.iter()
        .filter(|op| op.is_required() || observed.contains(&op.action.written()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// The search

#[derive(Debug)]
enum SearchOutcome {
    Linearizable,
    NotLinearizable(Stuck),
    GaveUp(Limit),
}

/// The furthest point the search reached before every path ended: the
/// linearization with the most operations, and the operation whose
/// completion it could not pass. Positions refer to the slice given to
/// `search`.
#[derive(Debug)]
struct Stuck {
    linearized: Vec<usize>,
    state: Option<i64>,
    blocked: usize,
    pending: Vec<usize>,
}

impl Stuck {
    fn describe(&self, ops: &[RegisterOp]) -> String {
        let after = match self.linearized.last() {
            Some(&last) => format!(
                "the longest linearization found has {} ops and ends with {}",
                self.linearized.len(),
                ops[last].describe()
            ),
            None => "no op can be linearized first".to_string(),
        };
        let pending: Vec<String> = self
            .pending
            .iter()
            .take(6)
            .map(|&op| ops[op].describe())
            .collect();
        format!(
            "No linearization reaches the completion of {}: {after}, leaving the register at \
             {}, and no order of the pending ops [{}] gets past it.",
            ops[self.blocked].describe(),
            show(self.state),
            pending.join(", ")
        )
    }

    fn indices(&self, ops: &[RegisterOp]) -> Vec<u64> {
        let last = self.linearized.last().copied();
        let mut indices = ops[self.blocked].indices();
        for &op in last.iter().chain(self.pending.iter().take(6)) {
            indices.extend(ops[op].indices());
        }
        indices
    }
}

/// A doubly linked list of call and return events in time order, with
/// removal and re-insertion in O(1). Node 0 is the head and the last node
/// the tail. Operation `op` has its call at node `2 * op + 1` and its return
/// at node `2 * op + 2`; `next` and `prev` link the nodes in time order.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
}

const HEAD: usize = 0;

impl EventList {
    fn new(ops: &[RegisterOp]) -> EventList {
        // Returns of indeterminate ops sort after every real event.
        let mut events: Vec<(u64, usize)> = Vec::with_capacity(2 * ops.len());
        for (op, register_op) in ops.iter().enumerate() {
            events.push((register_op.invoked, call_node(op)));
            events.push((register_op.returned.unwrap_or(u64::MAX), call_node(op) + 1));
        }
        events.sort_unstable();
        let tail = 2 * ops.len() + 1;
        let mut list = EventList {
            next: vec![tail; tail + 1],
            prev: vec![HEAD; tail + 1],
        };
        let mut previous = HEAD;
        for (_, node) in events {
            list.next[previous] = node;
            list.prev[node] = previous;
            previous = node;
        }
        list.next[previous] = tail;
        list.prev[tail] = previous;
        list
    }

    fn tail(&self) -> usize {
        self.next.len() - 1
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    /// Removes an operation's call and return.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(call + 1);
    }

    /// Undoes the most recent `lift` still in effect, which must be `call`'s.
    fn unlift(&mut self, call: usize) {
        self.relink(call + 1);
        self.relink(call);
    }
}

fn call_node(op: usize) -> usize {
    2 * op + 1
}

fn op_of(node: usize) -> usize {
    (node - 1) / 2
}

fn is_call(node: usize) -> bool {
    node % 2 == 1
}

/// The memo key: a bitset of linearized op positions followed by two words
/// for the register value, so a lookup needs no allocation.
struct MemoKey {
    words: Vec<u64>,
    bitset_len: usize,
}

impl MemoKey {
    fn new(ops: usize) -> MemoKey {
        let bitset_len = ops.div_ceil(64);
        MemoKey {
            words: vec![0; bitset_len + 2],
            bitset_len,
        }
    }

    fn set(&mut self, bit: usize) {
        self.words[bit / 64] |= 1 << (bit % 64);
    }

    fn clear(&mut self, bit: usize) {
        self.words[bit / 64] &= !(1 << (bit % 64));
    }

    /// Returns the key for the current bitset with `state` as the value.
    fn with_state(&mut self, state: Option<i64>) -> &[u64] {
        let (tag, value) = match state {
            None => (0, 0),
            Some(value) => (1, value as u64),
        };
        self.words[self.bitset_len] = tag;
        self.words[self.bitset_len + 1] = value;
        &self.words
    }
}

/// A fast, non-cryptographic hasher for the memo set (multiply and rotate,
/// as in rustc's FxHash); its keys come from the checker, not an attacker.
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type Memo = HashSet<Vec<u64>, BuildHasherDefault<FastHasher>>;

/// Searches for a linearization of `ops`, all on one key, starting from the
/// never-written register. Indeterminate ops may be left out.
fn search(ops: &[RegisterOp], deadline: Instant, memo_limit_bytes: usize) -> SearchOutcome {
    let mut list = EventList::new(ops);
    let tail = list.tail();
    let mut state: Option<i64> = None;
    let mut linearized = MemoKey::new(ops.len());
    let mut memo = Memo::default();
    // Each entry: its words, the `Vec` header and about 16 bytes of table
    // and allocator overhead.
    let memo_capacity = memo_limit_bytes / (8 * linearized.words.len() + 40);
    // Call nodes of the linearized ops in order, with the state before each.
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut stuck: Option<Stuck> = None;
    let mut node = list.next[HEAD];
    let mut steps: u64 = 0;
    loop {
        if steps % STEPS_PER_CLOCK_CHECK == 0 && Instant::now() >= deadline {
            return SearchOutcome::GaveUp(Limit::Time);
        }
        if memo.len() >= memo_capacity {
            return SearchOutcome::GaveUp(Limit::Memory);
        }
        steps += 1;

        // Every required op is linearized once the list is empty or only
        // contains indeterminate ops, whose returns sort last.
        if node == tail || (!is_call(node) && !ops[op_of(node)].is_required()) {
            return SearchOutcome::Linearizable;
        }

        if is_call(node) {
            let op = op_of(node);
            if let Some(next_state) = step(state, ops[op].action) {
                linearized.set(op);
                let key = linearized.with_state(next_state);
                if !memo.contains(key) {
                    memo.insert(key.to_vec());
                    stack.push((node, state));
                    state = next_state;
                    list.lift(node);
                    node = list.next[HEAD];
                    continue;
                }
                linearized.clear(op);
            }
            node = list.next[node];
            continue;
        }

        // A required op returned before it could be linearized: backtrack.
        if stuck
            .as_ref()
            .is_none_or(|deepest| stack.len() > deepest.linearized.len())
        {
            stuck = Some(record_stuck(&list, &stack, state, node));
        }
        let Some((call, previous_state)) = stack.pop() else {
            let stuck = stuck.expect("recorded before the stack can be empty");
            return SearchOutcome::NotLinearizable(stuck);
        };
        linearized.clear(op_of(call));
        state = previous_state;
        list.unlift(call);
        node = list.next[call];
    }
}

fn record_stuck(
    list: &EventList,
    stack: &[(usize, Option<i64>)],
    state: Option<i64>,
    blocking_return: usize,
) -> Stuck {
    let mut pending = Vec::new();
    let mut node = list.next[HEAD];
    while node != blocking_return {
        if is_call(node) {
            pending.push(op_of(node));
        }
        node = list.next[node];
    }
    Stuck {
        linearized: stack.iter().map(|&(call, _)| op_of(call)).collect(),
        state,
        blocked: op_of(blocking_return),
        pending,
    }
}

// ---------------------------------------------------------------------------
// Naming the anomaly

/// A definite anomaly on one key, with the history indices that show it.
#[derive(Debug)]
struct Evidence {
    kind: &'static str,
    message: String,
    indices: Vec<u64>,
}

/// Summary of the sources of an observed value: the writes and
/// compare-and-sets of that value invoked before the observation completed,
/// or the initial state for `nothing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sources {
    /// No op wrote the value before the observation completed.
    Missing,
    /// The value is the never-written initial state.
    Initial,
    /// Every source completed `ok`; the latest completed at this index.
    Completed(u64),
    /// Some source is indeterminate and may have landed at any time.
    Open,
}

impl Sources {
    /// Returns whether every source certainly took effect before `time`.
    fn all_before(self, time: u64) -> bool {
        match self {
            Sources::Initial => true,
            Sources::Completed(latest) => latest < time,
            Sources::Missing | Sources::Open => false,
        }
    }
}

/// An operation that required the register to hold `value`: an `ok` read,
/// or an `ok` compare-and-set (which observed its `from`).
#[derive(Clone, Copy, Debug)]
struct Observation {
    op: usize,
    value: Option<i64>,
    sources: Sources,
}

/// Lookups over one key's ops that `classify` repeats for every observation.
struct KeyIndex<'a> {
    ops: &'a [RegisterOp],
    /// Positions of the ops that write each value.
    writers: HashMap<i64, Vec<usize>>,
    /// Positions of `ok` writes and compare-and-sets, by completion.
    by_completion: Vec<usize>,
    /// `max_invoked[i]`: the latest invocation among `by_completion[..=i]`.
    max_invoked: Vec<u64>,
}

impl KeyIndex<'_> {
    fn new(ops: &[RegisterOp]) -> KeyIndex<'_> {
        let mut writers: HashMap<i64, Vec<usize>> = HashMap::new();
        for (position, op) in ops.iter().enumerate() {
            if let Some(value) = op.action.written() {
                writers.entry(value).or_default().push(position);
            }
        }
        let mut by_completion: Vec<usize> = (0..ops.len())
            .filter(|&position| {
                ops[position].is_required() && ops[position].action.written().is_some()
            })
            .collect();
        by_completion.sort_by_key(|&position| ops[position].returned);
        let max_invoked = by_completion
            .iter()
            .scan(0, |latest, &position| {
                *latest = ops[position].invoked.max(*latest);
                Some(*latest)
            })
            .collect();
        KeyIndex {
            ops,
            writers,
            by_completion,
            max_invoked,
        }
    }

    fn observations(&self) -> Vec<Observation> {
        let observed = self
            .ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.is_required());
        observed
            .filter_map(|(position, op)| {
                let value = op.action.observed()?;
                Some(Observation {
                    op: position,
                    value,
                    sources: self.sources(position, value),
                })
            })
            .collect()
    }

    fn sources(&self, position: usize, value: Option<i64>) -> Sources {
        let Some(value) = value else {
            return Sources::Initial;
        };
        let deadline = self.ops[position]
            .returned
            .expect("observations completed ok");
        let candidates = self.writers.get(&value).map_or(&[][..], Vec::as_slice);
        let mut sources = Sources::Missing;
        for &writer in candidates {
            let op = &self.ops[writer];
            if writer == position || op.invoked >= deadline {
                continue;
            }
            sources = match (op.returned, sources) {
                (None, _) | (_, Sources::Open) => Sources::Open,
                (Some(returned), Sources::Completed(latest)) => {
                    Sources::Completed(returned.max(latest))
                }
                (Some(returned), _) => Sources::Completed(returned),
            };
        }
        sources
    }

    /// Returns whether some op wrote `value` after every source described by
    /// `sources` had completed, so the value is certainly the newer one.
    fn written_after(&self, value: Option<i64>, sources: Sources) -> bool {
        let Some(value) = value else {
            return false;
        };
        let writers = self.writers.get(&value).map_or(&[][..], Vec::as_slice);
        writers.iter().any(|&writer| match sources {
            Sources::Initial => true,
            Sources::Completed(latest) => self.ops[writer].invoked > latest,
            Sources::Missing | Sources::Open => false,
        })
    }

    /// Finds the `ok` write that certainly overwrote every source of an
    /// observation's value before the observation began: invoked after the
    /// sources completed, completed before the observation was invoked.
    /// When several qualify, returns the one that completed last.
    fn missed_write(&self, observation: &Observation) -> Option<usize> {
        let after = match observation.sources {
            Sources::Initial => None,
            Sources::Completed(latest) => Some(latest),
            Sources::Missing | Sources::Open => return None,
        };
        let began = self.ops[observation.op].invoked;
        let end = self.by_completion.partition_point(|&position| {
            self.ops[position].returned.is_some_and(|done| done < began)
        });
        if end == 0 || after.is_some_and(|after| self.max_invoked[end - 1] <= after) {
            return None;
        }
        self.by_completion[..end]
            .iter()
            .rev()
            .copied()
            .find(|&position| after.is_none_or(|after| self.ops[position].invoked > after))
    }
}

/// Names the anomaly on one key from definite evidence, or returns `None`
/// when the key shows none of the patterns below (the search then reports
/// it as "not linearizable" if it found no linearization).
///
/// 1. Impossible read: an observation saw a value that no op wrote before
///    it completed.
/// 2. Stale observation: every source of the value seen (see `Sources`)
///    completed before some `ok` write W of another value began, and W
///    completed before the observation began, so W certainly overwrote
///    the value first. W is the "missed write".
///
/// A stale observation O is then named, in this order:
/// - "lost write" if O is a compare-and-set, because a compare-and-set goes
///   through the write path, which must never see an old value;
/// - "lost write" if O is confirmed and not refuted;
/// - "stale read" otherwise.
///
/// Confirmed means either of:
/// - another process saw the same value after W completed, while every
///   source of that value preceded W (a second client saw the old state);
/// - the same process had earlier seen a value written after every source
///   of O's value completed, so this client went back in time. A client
///   that stays on one lagging replica never does.
///
/// Refuted means either of:
/// - an observation invoked after O completed saw a different value whose
///   sources all completed before O began (an older state survived);
/// - after O, an observation saw a different value and a later one saw
///   O's value again, although every write of it had completed before.
///
/// A lost write looks like the whole zone going back to an older state for
/// good. A stale read looks like one replica serving reads from the past
/// while others serve the present. A lone stale read followed by a blind overwrite
/// fits both stories and is named "stale read". On the simulated faults of
/// the ignored test `classification_rates`, which prints the table, a
/// lagging replica is named stale read on 95-100% of keys, and a power loss
/// is named lost write on 60-70% of the keys where it shows (stale read on
/// most of the rest).
///
/// The key's kind is the first of impossible read, lost write, stale read
/// found among its first `MAX_CLASSIFIED` stale or impossible observations.
fn classify(ops: &[RegisterOp]) -> Option<Evidence> {
    let index = KeyIndex::new(ops);
    let observations = index.observations();
    let mut best: Option<Evidence> = None;
    let mut examined = 0;
    for observation in &observations {
        let evidence = if observation.sources == Sources::Missing {
            impossible_read(ops, observation)
        } else if let Some(missed) = index.missed_write(observation) {
            name_stale(&index, &observations, observation, missed)
        } else {
            continue;
        };
        examined += 1;
        if best
            .as_ref()
            .is_none_or(|best| kind_rank(evidence.kind) < kind_rank(best.kind))
        {
            best = Some(evidence);
        }
        if examined == MAX_CLASSIFIED {
            break;
        }
    }
    if examined > 1 {
        if let Some(best) = best.as_mut() {
            let more = if examined == MAX_CLASSIFIED {
                " or more"
            } else {
                ""
            };
            best.message.push_str(&format!(
                " ({examined}{more} stale or impossible observations on this key.)"
            ));
        }
    }
    best
}

fn impossible_read(ops: &[RegisterOp], observation: &Observation) -> Evidence {
    let op = &ops[observation.op];
    Evidence {
        kind: IMPOSSIBLE_READ,
        message: format!(
            "{}: no op invoked before it completed wrote {}.",
            op.describe(),
            show(observation.value)
        ),
        indices: op.indices(),
    }
}

/// Names a stale observation "lost write" or "stale read" (see `classify`).
fn name_stale(
    index: &KeyIndex,
    observations: &[Observation],
    stale: &Observation,
    missed: usize,
) -> Evidence {
    let ops = index.ops;
    let op = &ops[stale.op];
    let missed_op = &ops[missed];
    let same_value: Vec<&Observation> = observations
        .iter()
        .filter(|other| other.value == stale.value)
        .collect();
    let later = || {
        observations
            .iter()
            .filter(|later| op.precedes(&ops[later.op]))
    };

    let refuted = later().any(|later| {
        let older_state_survived =
            later.value != stale.value && later.sources.all_before(op.invoked);
        older_state_survived || reappears_after(ops, &same_value, later)
    });
    let seen_by_another = same_value.iter().copied().find(|other| {
        ops[other.op].process != op.process
            && missed_op.precedes(&ops[other.op])
            && other.sources.all_before(missed_op.invoked)
    });
    let newer_seen_before = observations.iter().find(|earlier| {
        ops[earlier.op].process == op.process
            && ops[earlier.op].precedes(op)
            && earlier.value != stale.value
            && index.written_after(earlier.value, stale.sources)
    });

    let mut indices = op.indices();
    indices.extend(missed_op.indices());
    if matches!(op.action, Action::Cas { .. }) {
        let message = format!(
            "{} succeeded although {} had already overwritten {}.",
            op.describe(),
            missed_op.describe(),
            show(stale.value)
        );
        return Evidence {
            kind: LOST_WRITE,
            message,
            indices,
        };
    }
    let confirmation = match (seen_by_another, newer_seen_before) {
        (Some(other), _) => Some((other, "another client also saw it at")),
        (None, Some(earlier)) => Some((earlier, "the same client had seen a newer value at")),
        (None, None) => None,
    };
    if let (Some((confirming, how)), false) = (confirmation, refuted) {
        let confirming_op = &ops[confirming.op];
        indices.extend(confirming_op.indices());
        let message = format!(
            "{} was acknowledged, then {} saw the older {} ({how} {}), and no later op saw a \
             state from before {}.",
            missed_op.describe(),
            op.describe(),
            show(stale.value),
            confirming_op.describe(),
            op.describe()
        );
        return Evidence {
            kind: LOST_WRITE,
            message,
            indices,
        };
    }
    let message = format!(
        "{} although {} had already overwritten {}.",
        op.describe(),
        missed_op.describe(),
        show(stale.value)
    );
    Evidence {
        kind: STALE_READ,
        message,
        indices,
    }
}

/// Returns whether some observation in `same_value`, invoked after `changed`
/// completed, saw that value again although every write of it had
/// completed before `changed` began. `changed` saw a different value, so
/// the register had moved on.
fn reappears_after(ops: &[RegisterOp], same_value: &[&Observation], changed: &Observation) -> bool {
    let Some(first) = same_value.first() else {
        return false;
    };
    if changed.value == first.value {
        return false;
    }
    let changed_op = &ops[changed.op];
    same_value.iter().any(|again| {
        changed_op.precedes(&ops[again.op]) && again.sources.all_before(changed_op.invoked)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const BUDGET: Duration = Duration::from_secs(120);

    fn read(key: &str, value: Option<i64>) -> Call {
        Call::Read {
            key: key.to_string(),
            value,
        }
    }

    fn write(key: &str, value: i64) -> Call {
        Call::Write {
            key: key.to_string(),
            value,
        }
    }

    fn cas(key: &str, from: i64, to: i64) -> Call {
        Call::Cas {
            key: key.to_string(),
            from,
            to,
        }
    }

    /// Builds a history entry by entry; each entry gets the next index.
    #[derive(Default)]
    struct History {
        ops: Vec<Op>,
    }

    impl History {
        fn push(&mut self, process: u64, kind: OpType, call: Call) -> &mut Self {
            let index = self.ops.len() as u64;
            self.ops.push(Op {
                index,
                time_ns: index * 1_000,
                process: Process::Client(process),
                kind,
                call,
                error: None,
            });
            self
        }

        fn invoke(&mut self, process: u64, call: Call) -> &mut Self {
            self.push(process, OpType::Invoke, call)
        }

        fn complete(&mut self, process: u64, kind: OpType, call: Call) -> &mut Self {
            self.push(process, kind, call)
        }

        /// Appends an operation that completes before the next one starts.
        fn op(&mut self, process: u64, kind: OpType, call: Call) -> &mut Self {
            let invocation = match &call {
                Call::Read { key, .. } => read(key, None),
                other => other.clone(),
            };
            self.invoke(process, invocation)
                .complete(process, kind, call)
        }

        fn check(&self) -> Verdict {
            check(&self.ops, BUDGET)
        }
    }

    fn assert_valid(verdict: &Verdict) {
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
    }

    fn assert_anomaly(verdict: &Verdict, kind: &str) {
        assert_eq!(verdict.validity, Validity::Invalid, "{verdict:#?}");
        assert_eq!(verdict.anomalies[0].kind, kind, "{verdict:#?}");
        assert!(verdict.summary.starts_with(kind), "{}", verdict.summary);
    }

    use crate::checker::Validity;

    #[test]
    fn sequential_history_valid() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, read("x", None))
            .op(1, OpType::Ok, write("x", 1))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(2, OpType::Ok, cas("x", 1, 2))
            .op(3, OpType::Ok, read("x", Some(2)))
            .op(3, OpType::Ok, read("y", None));
        let verdict = history.check();
        assert_valid(&verdict);
        assert_eq!(
            verdict.line(),
            "linearizable  valid    (6 ops, 2 keys, 0 indeterminate, 0 keys undecided)"
        );
    }

    #[test]
    fn stale_read_named() {
        // Reads from a lagging replica: one client reads 1 after 2 was
        // acknowledged, another then reads 2.
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(3, OpType::Ok, read("x", Some(2)));
        let verdict = history.check();
        assert_anomaly(&verdict, "stale read");
        assert!(verdict.summary.contains("key x"), "{}", verdict.summary);
        assert!(verdict.anomalies[0].indices.contains(&4), "{verdict:#?}");
    }

    #[test]
    fn lone_stale_read_then_overwrite_named_stale() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, write("x", 3))
            .op(3, OpType::Ok, read("x", Some(3)));
        assert_anomaly(&history.check(), "stale read");
    }

    #[test]
    fn lost_write_named() {
        // State goes back to 1 for everyone after 2 was acknowledged, and
        // the zone carries on from there.
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(3, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, write("x", 3))
            .op(2, OpType::Ok, read("x", Some(3)));
        let verdict = history.check();
        assert_anomaly(&verdict, "lost write");
        assert!(verdict.summary.contains("write 2"), "{}", verdict.summary);
    }

    #[test]
    fn lost_write_after_newer_read_named() {
        // The client saw 2, then the zone went back to 1 for good.
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(2)))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, write("x", 3));
        let verdict = history.check();
        assert_anomaly(&verdict, "lost write");
        assert!(
            verdict
                .summary
                .contains("the same client had seen a newer value at op 4 read 2"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn lost_write_seen_by_cas() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, cas("x", 1, 3));
        assert_anomaly(&history.check(), "lost write");
    }

    #[test]
    fn stale_reads_alternating_named_stale() {
        // Two clients of a partitioned replica see 1 while the majority
        // moves on, then the old value shows up again after a newer one.
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(3, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, write("x", 3))
            .op(1, OpType::Ok, read("x", Some(3)))
            .op(2, OpType::Ok, read("x", Some(1)));
        assert_anomaly(&history.check(), "stale read");
    }

    #[test]
    fn missed_write_seen_later_named_stale() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(3, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, read("x", Some(2)));
        assert_anomaly(&history.check(), "stale read");
    }

    #[test]
    fn read_of_initial_after_write_stale() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(2, OpType::Ok, read("x", None));
        assert_anomaly(&history.check(), "stale read");
    }

    #[test]
    fn value_never_written_impossible() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(2, OpType::Ok, read("x", Some(7)));
        assert_anomaly(&history.check(), "impossible read");
    }

    #[test]
    fn read_before_write_invoked_impossible() {
        let mut history = History::default();
        history
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(1, OpType::Ok, write("x", 1));
        assert_anomaly(&history.check(), "impossible read");
    }

    #[test]
    fn failed_write_never_applied() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Fail, write("x", 2))
            .op(2, OpType::Ok, read("x", Some(2)));
        assert_anomaly(&history.check(), "impossible read");
    }

    /// Two writes overlap each other and two reads; the reads see the
    /// writes in one order, which must be valid for either order.
    fn overlapping_writes(first: i64, second: i64) -> History {
        let mut history = History::default();
        history
            .invoke(1, write("x", 1))
            .invoke(2, write("x", 2))
            .op(3, OpType::Ok, read("x", Some(first)))
            .op(4, OpType::Ok, read("x", Some(second)))
            .complete(2, OpType::Ok, write("x", 2))
            .complete(1, OpType::Ok, write("x", 1))
            .op(3, OpType::Ok, read("x", Some(second)));
        history
    }

    #[test]
    fn overlapping_writes_either_order_valid() {
        assert_valid(&overlapping_writes(1, 2).check());
        assert_valid(&overlapping_writes(2, 1).check());
    }

    #[test]
    fn overlapping_writes_flip_flop_invalid() {
        let mut history = History::default();
        history
            .invoke(1, write("x", 1))
            .invoke(2, write("x", 2))
            .op(3, OpType::Ok, read("x", Some(1)))
            .op(4, OpType::Ok, read("x", Some(2)))
            .op(3, OpType::Ok, read("x", Some(1)))
            .complete(2, OpType::Ok, write("x", 2))
            .complete(1, OpType::Ok, write("x", 1));
        let verdict = history.check();
        assert_anomaly(&verdict, "not linearizable");
        assert!(
            verdict.summary.contains("No linearization reaches"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn indeterminate_write_either_outcome_valid() {
        for seen in [Some(1), None] {
            let mut history = History::default();
            history
                .op(1, OpType::Info, write("x", 1))
                .op(2, OpType::Ok, read("x", seen))
                .op(3, OpType::Ok, read("x", seen));
            let verdict = history.check();
            assert_valid(&verdict);
            assert_eq!(verdict.counts[2].value, 1, "{verdict:#?}");
        }
    }

    #[test]
    fn indeterminate_write_lands_late_valid() {
        // It may take effect long after the client gave up on it.
        let mut history = History::default();
        history
            .op(1, OpType::Info, write("x", 1))
            .op(2, OpType::Ok, read("x", None))
            .op(2, OpType::Ok, read("x", None))
            .op(3, OpType::Ok, read("x", Some(1)));
        assert_valid(&history.check());
    }

    #[test]
    fn pending_write_may_apply() {
        let mut history = History::default();
        history
            .invoke(1, write("x", 1))
            .op(2, OpType::Ok, read("x", None))
            .op(3, OpType::Ok, read("x", Some(1)));
        assert_valid(&history.check());
    }

    #[test]
    fn indeterminate_write_applies_once() {
        let mut history = History::default();
        history
            .op(1, OpType::Info, write("x", 1))
            .op(2, OpType::Ok, read("x", Some(1)))
            .op(2, OpType::Ok, read("x", None));
        assert_anomaly(&history.check(), "not linearizable");
    }

    #[test]
    fn cas_requires_current_value() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, cas("x", 1, 2))
            .op(2, OpType::Ok, read("x", Some(2)));
        assert_valid(&history.check());

        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Ok, cas("x", 5, 6));
        assert_anomaly(&history.check(), "impossible read");

        let mut history = History::default();
        history.op(1, OpType::Ok, cas("x", 0, 1));
        assert_anomaly(&history.check(), "impossible read");
    }

    #[test]
    fn failed_cas_dropped() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 1))
            .op(1, OpType::Fail, cas("x", 1, 2))
            .op(2, OpType::Ok, read("x", Some(1)));
        assert_valid(&history.check());
    }

    #[test]
    fn indeterminate_cas_either_outcome_valid() {
        for seen in [1, 2] {
            let mut history = History::default();
            history
                .op(1, OpType::Ok, write("x", 1))
                .op(1, OpType::Info, cas("x", 1, 2))
                .op(2, OpType::Ok, read("x", Some(seen)));
            assert_valid(&history.check());
        }
    }

    #[test]
    fn indeterminate_cas_needs_its_from() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("x", 5))
            .op(1, OpType::Info, cas("x", 1, 2))
            .op(2, OpType::Ok, read("x", Some(2)));
        assert_anomaly(&history.check(), "not linearizable");
    }

    #[test]
    fn keys_checked_independently() {
        let mut history = History::default();
        history
            .op(1, OpType::Ok, write("a", 1))
            .op(1, OpType::Ok, write("b", 1))
            .op(1, OpType::Ok, write("b", 2))
            .op(2, OpType::Ok, read("a", Some(1)))
            .op(2, OpType::Ok, read("b", Some(1)));
        let verdict = history.check();
        assert_eq!(verdict.anomalies.len(), 1, "{verdict:#?}");
        assert!(
            verdict.anomalies[0].message.starts_with("key b:"),
            "{verdict:#?}"
        );
    }

    #[test]
    fn mismatched_completion_unknown() {
        let mut history = History::default();
        history
            .invoke(1, write("x", 1))
            .complete(1, OpType::Ok, write("y", 1));
        let verdict = history.check();
        assert_eq!(verdict.validity, Validity::Unknown);
        assert!(
            verdict.summary.contains("op 1 completes op 0"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn indices_out_of_order_unknown() {
        let mut history = History::default();
        history.op(1, OpType::Ok, write("x", 1));
        history.ops[1].index = 0;
        let verdict = history.check();
        assert_eq!(verdict.validity, Validity::Unknown);
        assert!(
            verdict.summary.contains("indices must increase"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn no_register_ops_unknown() {
        assert_eq!(check(&[], BUDGET).validity, Validity::Unknown);
    }

    // -----------------------------------------------------------------------
    // Generated histories

    /// Shape of a generated history.
    #[derive(Clone, Copy)]
    struct Spec {
        processes: usize,
        ops: usize,
        keys: usize,
        /// Written values are drawn from `0..range`, or unique when `None`.
        value_range: Option<i64>,
        /// Share of writes and compare-and-sets that end `info` or `fail`,
        /// and of reads that end `info`.
        indeterminate_rate: f64,
        fault: Fault,
    }

    /// A misbehaviour of the zone to simulate, in generator time units.
    #[derive(Clone, Copy)]
    enum Fault {
        None,
        /// Reads by process slot 0 return the register as it was `lag`
        /// earlier, like a replica that serves reads from its own state.
        LaggingReader {
            lag: u64,
        },
        /// At `at`, every key reverts to its value at `at - window` (the
        /// acknowledged writes in between are lost), and ops taking effect
        /// during the following `outage` fail.
        PowerLoss {
            at: u64,
            window: u64,
            outage: u64,
        },
    }

    enum Planned {
        Read,
        Write(i64),
        Cas(i64, i64),
    }

    struct PlannedOp {
        slot: usize,
        process: u64,
        key: String,
        planned: Planned,
        invoke_at: u64,
        complete_at: u64,
        /// When the op takes effect, strictly inside its interval for ops
        /// that complete `ok`; `None` when it never does.
        effect_at: Option<u64>,
        outcome: OpType,
        /// Whether the completion entry is left out, as when a run ends.
        pending: bool,
        result: Call,
    }

    /// Generates a linearizable history: each op takes effect at a random
    /// point of its interval (an indeterminate op possibly later, or never),
    /// and reads and compare-and-sets get their results from a register
    /// applied in effect order.
    fn generate(seed: u64, spec: Spec) -> Vec<Op> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut planned = plan(&mut rng, spec);
        apply_in_effect_order(&mut planned, spec.fault);
        emit(&mut rng, &planned)
    }

    fn plan(rng: &mut StdRng, spec: Spec) -> Vec<PlannedOp> {
        let mut next_value = 0;
        let mut next_process = spec.processes as u64;
        let mut planned = Vec::new();
        for slot in 0..spec.processes {
            let mut process = slot as u64;
            let mut time = rng.gen_range(0..50u64);
            for _ in 0..spec.ops / spec.processes {
                let invoke_at = time + rng.gen_range(1..20);
                let complete_at = invoke_at + rng.gen_range(1..100);
                time = complete_at;
                let roll: f64 = rng.gen();
                let mut value = || match spec.value_range {
                    Some(range) => rng.gen_range(0..range),
                    None => {
                        next_value += 1;
                        next_value
                    }
                };
                let planned_op = if roll < 0.4 {
                    Planned::Read
                } else if roll < 0.75 {
                    Planned::Write(value())
                } else {
                    let to = value();
                    let from = match spec.value_range {
                        Some(range) => rng.gen_range(0..range),
                        None => rng.gen_range((to - 8).max(1)..to.max(2)),
                    };
                    Planned::Cas(from, to)
                };
                // Effect points use 4x time so they never tie with events.
                let inside = rng.gen_range(4 * invoke_at + 1..4 * complete_at);
                let (outcome, effect_at, pending) = if rng.gen_bool(spec.indeterminate_rate) {
                    let late = 4 * complete_at + rng.gen_range(1..400);
                    let effect = match planned_op {
                        Planned::Read => None,
                        _ if rng.gen_bool(0.2) => None,
                        _ => Some(if rng.gen_bool(0.5) { late } else { inside }),
                    };
                    let outcome = if effect.is_none()
                        && rng.gen_bool(0.3)
                        && !matches!(planned_op, Planned::Read)
                    {
                        OpType::Fail
                    } else {
                        OpType::Info
                    };
                    (
                        outcome,
                        effect,
                        outcome == OpType::Info && rng.gen_bool(0.2),
                    )
                } else {
                    (OpType::Ok, Some(inside), false)
                };
                let key = format!("k{}", rng.gen_range(0..spec.keys));
                planned.push(PlannedOp {
                    slot,
                    process,
                    key: key.clone(),
                    result: read(&key, None),
                    planned: planned_op,
                    invoke_at,
                    complete_at,
                    effect_at,
                    outcome,
                    pending,
                });
                if outcome == OpType::Info {
                    process = next_process;
                    next_process += 1;
                }
            }
        }
        planned
    }

    /// Runs a register per key over the ops in effect order and fills in
    /// each op's result, altered as `fault` describes. A compare-and-set whose
    /// `from` does not match takes no effect and completes `fail` (or stays
    /// `info`).
    fn apply_in_effect_order(planned: &mut [PlannedOp], fault: Fault) {
        let mut order: Vec<usize> = (0..planned.len()).collect();
        order.sort_by_key(|&op| (planned[op].effect_at, op));
        // Per key, the value after each effect, in effect-time order.
        let mut timelines: BTreeMap<String, Vec<(u64, Option<i64>)>> = BTreeMap::new();
        let value_at = |timeline: &[(u64, Option<i64>)], time: u64| {
            timeline
                .iter()
                .rev()
                .find(|(at, _)| *at <= time)
                .and_then(|(_, value)| *value)
        };
        let mut lost = false;
        let mut last_read: BTreeMap<(usize, String), Option<i64>> = BTreeMap::new();
        for position in order {
            let op = &mut planned[position];
            if let (Fault::PowerLoss { at, window, outage }, Some(effect)) = (fault, op.effect_at) {
                if effect >= 4 * at && !lost {
                    lost = true;
                    for timeline in timelines.values_mut() {
                        let survivor = value_at(timeline, 4 * (at - window));
                        timeline.push((4 * at, survivor));
                    }
                }
                if (4 * at..4 * (at + outage)).contains(&effect) {
                    op.effect_at = None;
                    op.outcome = OpType::Fail;
                }
            }
            let timeline = timelines.entry(op.key.clone()).or_default();
            let state = timeline.last().and_then(|(_, value)| *value);
            let Some(effect) = op.effect_at else {
                op.result = match op.planned {
                    Planned::Read => read(&op.key, None),
                    Planned::Write(value) => write(&op.key, value),
                    Planned::Cas(from, to) => cas(&op.key, from, to),
                };
                continue;
            };
            op.result = match op.planned {
                Planned::Read => {
                    let value = match fault {
                        Fault::LaggingReader { lag } if op.slot == 0 => {
                            value_at(timeline, effect.saturating_sub(4 * lag))
                        }
                        _ => state,
                    };
                    if op.outcome == OpType::Ok {
                        last_read.insert((op.slot, op.key.clone()), value);
                    }
                    read(&op.key, value)
                }
                Planned::Write(value) => {
                    timeline.push((effect, Some(value)));
                    write(&op.key, value)
                }
                Planned::Cas(planned_from, to) => {
                    // Like the real workload, expect the value this client last read.
                    let last = last_read.get(&(op.slot, op.key.clone())).copied().flatten();
                    let from = last.unwrap_or(planned_from);
                    op.planned = Planned::Cas(from, to);
                    if state == Some(from) {
                        timeline.push((effect, Some(to)));
                    } else if op.outcome == OpType::Ok {
                        op.outcome = OpType::Fail;
                    }
                    cas(&op.key, from, to)
                }
            };
        }
    }

    fn emit(rng: &mut StdRng, planned: &[PlannedOp]) -> Vec<Op> {
        let mut events: Vec<(u64, u64, Op)> = Vec::new();
        for op in planned {
            let invocation = match &op.result {
                Call::Read { key, .. } => read(key, None),
                other => other.clone(),
            };
            let entry = |kind, call| Op {
                index: 0,
                time_ns: 0,
                process: Process::Client(op.process),
                kind,
                call,
                error: None,
            };
            events.push((op.invoke_at, rng.gen(), entry(OpType::Invoke, invocation)));
            if !op.pending {
                events.push((
                    op.complete_at,
                    rng.gen(),
                    entry(op.outcome, op.result.clone()),
                ));
            }
        }
        events.sort_by_key(|(time, tie, _)| (*time, *tie));
        events
            .into_iter()
            .enumerate()
            .map(|(index, (time, _, mut op))| {
                op.index = index as u64;
                op.time_ns = time * 1_000;
                op
            })
            .collect()
    }

    const SEEDS: [u64; 6] = [1, 2, 3, 42, 1234, 98765];

    fn busy_spec() -> Spec {
        Spec {
            processes: 5,
            ops: 400,
            keys: 3,
            value_range: None,
            indeterminate_rate: 0.1,
            fault: Fault::None,
        }
    }

    #[test]
    fn generated_histories_valid() {
        for seed in SEEDS {
            for value_range in [None, Some(4)] {
                let spec = Spec {
                    value_range,
                    ..busy_spec()
                };
                let verdict = check(&generate(seed, spec), BUDGET);
                assert_eq!(
                    verdict.validity,
                    Validity::Valid,
                    "seed {seed}: {verdict:#?}"
                );
            }
        }
    }

    /// Positions of `ok` read completions in `history`.
    fn ok_reads(history: &[Op]) -> Vec<usize> {
        (0..history.len())
            .filter(|&i| {
                history[i].kind == OpType::Ok && matches!(history[i].call, Call::Read { .. })
            })
            .collect()
    }

    fn set_read_value(op: &mut Op, new: Option<i64>) {
        if let Call::Read { value, .. } = &mut op.call {
            *value = new;
        }
    }

    #[test]
    fn generated_with_unwritten_value_invalid() {
        for seed in SEEDS {
            let mut history = generate(seed, busy_spec());
            let reads = ok_reads(&history);
            let mut rng = StdRng::seed_from_u64(seed);
            let target = reads[rng.gen_range(0..reads.len())];
            set_read_value(&mut history[target], Some(-1));
            let verdict = check(&history, BUDGET);
            assert_anomaly(&verdict, "impossible read");
            assert!(
                verdict.anomalies[0].indices.contains(&(target as u64)),
                "seed {seed}"
            );
        }
    }

    /// Changes one read to return a value that an acknowledged write had
    /// certainly overwritten before the read began. Needs unique values.
    fn make_one_read_stale(rng: &mut StdRng, history: &mut [Op]) -> Option<usize> {
        let pairs: Vec<(u64, Option<u64>, Call, OpType)> = pairs(history)
            .iter()
            .map(|pair| {
                let completion = pair.completion.map(|op| op.index);
                let call = pair
                    .completion
                    .map_or(pair.invoke.call.clone(), |op| op.call.clone());
                (pair.invoke.index, completion, call, pair.outcome())
            })
            .collect();
        let key_of = |call: &Call| match call {
            Call::Read { key, .. } | Call::Write { key, .. } | Call::Cas { key, .. } => key.clone(),
            _ => String::new(),
        };
        let ok_writes: Vec<&(u64, Option<u64>, Call, OpType)> = pairs
            .iter()
            .filter(|(_, _, call, outcome)| {
                *outcome == OpType::Ok && matches!(call, Call::Write { .. })
            })
            .collect();
        let mut reads: Vec<&(u64, Option<u64>, Call, OpType)> = pairs
            .iter()
            .filter(|(_, _, call, outcome)| {
                *outcome == OpType::Ok && matches!(call, Call::Read { .. })
            })
            .collect();
        // Try reads in a random order until one has an old enough write.
        for _ in 0..reads.len() {
            let pick = rng.gen_range(0..reads.len());
            let (read_invoked, read_completed, read_call, _) = reads.swap_remove(pick);
            let key = key_of(read_call);
            let overwriter = ok_writes.iter().rev().find(|(_, done, call, _)| {
                key_of(call) == key && done.is_some_and(|d| d < *read_invoked)
            });
            let Some((overwriter_invoked, ..)) = overwriter else {
                continue;
            };
            let old = ok_writes.iter().find(|(_, done, call, _)| {
                key_of(call) == key && done.is_some_and(|d| d < *overwriter_invoked)
            });
            let Some((_, _, Call::Write { value, .. }, _)) = old else {
                continue;
            };
            let position = read_completed.expect("ok reads have completions") as usize;
            set_read_value(&mut history[position], Some(*value));
            return Some(position);
        }
        None
    }

    #[test]
    fn generated_with_stale_value_invalid() {
        for seed in SEEDS {
            let mut history = generate(seed, busy_spec());
            let mut rng = StdRng::seed_from_u64(seed);
            let target =
                make_one_read_stale(&mut rng, &mut history).expect("some read can be made stale");
            let verdict = check(&history, BUDGET);
            assert_eq!(
                verdict.validity,
                Validity::Invalid,
                "seed {seed}: {verdict:#?}"
            );
            assert_eq!(verdict.anomalies.len(), 1, "seed {seed}: {verdict:#?}");

            // The search alone must reject it too, not only the classification.
            let keys = split_by_key(&history).expect("generated histories are well formed");
            let rejected = keys
                .values()
                .filter(|key| {
                    let outcome = search(
                        &prune_unobserved(&key.ops),
                        Instant::now() + BUDGET,
                        MEMO_LIMIT_BYTES,
                    );
                    matches!(outcome, SearchOutcome::NotLinearizable(_))
                })
                .count();
            assert_eq!(rejected, 1, "seed {seed}, mutated op {target}");
        }
    }

    /// Decides linearizability by trying every order: an op may go next
    /// unless another op not yet placed completed before it was invoked.
    fn brute_force(ops: &[RegisterOp], placed: &mut Vec<bool>, state: Option<i64>) -> bool {
        if ops
            .iter()
            .zip(placed.iter())
            .all(|(op, &done)| done || !op.is_required())
        {
            return true;
        }
        for next in 0..ops.len() {
            let blocked =
                (0..ops.len()).any(|other| !placed[other] && ops[other].precedes(&ops[next]));
            if placed[next] || blocked {
                continue;
            }
            if let Some(after) = step(state, ops[next].action) {
                placed[next] = true;
                if brute_force(ops, placed, after) {
                    return true;
                }
                placed[next] = false;
            }
        }
        false
    }

    #[test]
    fn search_agrees_with_brute_force() {
        let spec = Spec {
            processes: 3,
            ops: 7,
            keys: 1,
            value_range: Some(3),
            indeterminate_rate: 0.25,
            fault: Fault::None,
        };
        let mut invalid = 0;
        for seed in 0..3000 {
            let mut history = generate(seed, spec);
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            let reads = ok_reads(&history);
            if !reads.is_empty() && rng.gen_bool(0.7) {
                let target = reads[rng.gen_range(0..reads.len())];
                let value = if rng.gen_bool(0.2) {
                    None
                } else {
                    Some(rng.gen_range(0..3))
                };
                set_read_value(&mut history[target], value);
            }
            let keys = split_by_key(&history).expect("generated histories are well formed");
            let Some(key) = keys.values().next() else {
                continue;
            };
            let expected = brute_force(&key.ops, &mut vec![false; key.ops.len()], None);
            let deadline = Instant::now() + BUDGET;
            for ops in [key.ops.clone(), prune_unobserved(&key.ops)] {
                let found = matches!(
                    search(&ops, deadline, MEMO_LIMIT_BYTES),
                    SearchOutcome::Linearizable
                );
                assert_eq!(found, expected, "seed {seed}: {history:#?}");
            }
            // The classification only reports definite anomalies.
            if classify(&key.ops).is_some() {
                assert!(
                    !expected,
                    "seed {seed}: classified a linearizable history: {history:#?}"
                );
            }
            invalid += usize::from(!expected);
        }
        // Both outcomes must be well represented for the comparison to mean much.
        assert!((300..2700).contains(&invalid), "{invalid} of 3000 invalid");
    }

    #[test]
    fn long_single_key_history_fast() {
        for (seed, value_range) in [(7, None), (8, Some(5))] {
            let spec = Spec {
                processes: 5,
                ops: 2000,
                keys: 1,
                value_range,
                indeterminate_rate: 0.02,
                fault: Fault::None,
            };
            let history = generate(seed, spec);
            let started = Instant::now();
            let verdict = check(&history, BUDGET);
            let elapsed = started.elapsed();
            eprintln!("2000 ops on one key, values {value_range:?}: {elapsed:?}");
            assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
            assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
        }
    }

    #[test]
    fn long_single_key_invalid_history_fast() {
        for (seed, indeterminate_rate) in [(9, 0.02), (10, 0.1)] {
            let spec = Spec {
                processes: 5,
                ops: 2000,
                keys: 1,
                value_range: None,
                indeterminate_rate,
                fault: Fault::None,
            };
            let mut history = generate(seed, spec);
            let started = Instant::now();
            assert_valid(&check(&history, BUDGET));
            let valid_elapsed = started.elapsed();

            let mut rng = StdRng::seed_from_u64(seed);
            make_one_read_stale(&mut rng, &mut history).expect("some read can be made stale");
            let keys = split_by_key(&history).expect("generated histories are well formed");
            let ops = prune_unobserved(&keys["k0"].ops);
            let started = Instant::now();
            let outcome = search(&ops, Instant::now() + BUDGET, MEMO_LIMIT_BYTES);
            let invalid_elapsed = started.elapsed();
            eprintln!(
                "2000 ops on one key, {indeterminate_rate} indeterminate: valid {valid_elapsed:?}, \
                 search of invalid {invalid_elapsed:?}"
            );
            assert!(
                matches!(outcome, SearchOutcome::NotLinearizable(_)),
                "{outcome:?}"
            );
            assert!(
                invalid_elapsed < Duration::from_secs(10),
                "took {invalid_elapsed:?}"
            );
        }
    }

    /// Checks one history per seed with `fault` on `keys` keys; returns
    /// the verdicts' summaries and the number of keys given each kind.
    fn classify_runs(
        fault: Fault,
        keys: usize,
        seeds: std::ops::Range<u64>,
    ) -> (Vec<String>, BTreeMap<String, usize>) {
        let spec = Spec {
            processes: 5,
            ops: 600,
            keys,
            value_range: None,
            indeterminate_rate: 0.05,
            fault,
        };
        let mut summaries = Vec::new();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for seed in seeds {
            let verdict = check(&generate(seed, spec), BUDGET);
            for anomaly in &verdict.anomalies {
                *kinds.entry(anomaly.kind.clone()).or_default() += 1;
            }
            if verdict.validity == Validity::Invalid {
                summaries.push(verdict.summary);
            }
        }
        (summaries, kinds)
    }

    const LAGGING: Fault = Fault::LaggingReader { lag: 150 };
    const POWER_LOSS: Fault = Fault::PowerLoss {
        at: 3_000,
        window: 300,
        outage: 500,
    };

    #[test]
    fn lagging_replica_named_stale_read() {
        let (summaries, kinds) = classify_runs(LAGGING, 3, 0..40);
        assert_eq!(summaries.len(), 40, "{kinds:?}");
        for summary in &summaries {
            assert!(summary.starts_with("stale read"), "{summary}");
        }
        let stale = kinds.get("stale read").copied().unwrap_or(0);
        assert!(stale * 100 >= 95 * 120, "{kinds:?}");
    }

    #[test]
    fn power_loss_named_lost_write() {
        let (summaries, kinds) = classify_runs(POWER_LOSS, 8, 0..40);
        let naming = summaries
            .iter()
            .filter(|summary| summary.contains("lost write"))
            .count();
        assert!(summaries.len() >= 38, "{kinds:?}");
        assert!(
            naming * 100 >= 85 * summaries.len(),
            "{naming} of {}: {kinds:?}",
            summaries.len()
        );
        let lost = kinds.get("lost write").copied().unwrap_or(0);
        let stale = kinds.get("stale read").copied().unwrap_or(0);
        assert!(lost > stale, "{kinds:?}");
    }

    /// Prints how the classification names simulated faults, for tuning:
    /// `cargo test -p ccs-jepsen --lib classification_rates -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn classification_rates() {
        let long_lag = Fault::LaggingReader { lag: 600 };
        let long_loss = Fault::PowerLoss {
            at: 3_000,
            window: 2_000,
            outage: 500,
        };
        let faults = [
            ("lagging", LAGGING),
            ("lagging long", long_lag),
            ("power loss", POWER_LOSS),
            ("power loss long", long_loss),
        ];
        for (name, fault) in faults {
            for keys in [1, 3, 8] {
                let (summaries, kinds) = classify_runs(fault, keys, 0..100);
                let naming = |kind: &str| {
                    summaries
                        .iter()
                        .filter(|summary| summary.contains(kind))
                        .count()
                };
                eprintln!(
                    "{name:16} {keys} keys: {} of 100 runs invalid, {} name stale read, {} lost write; keys {kinds:?}",
                    summaries.len(),
                    naming("stale read"),
                    naming("lost write"),
                );
            }
        }
    }

    #[test]
    fn zero_budget_unknown() {
        let history = generate(
            5,
            Spec {
                keys: 4,
                ..busy_spec()
            },
        );
        let verdict = check(&history, Duration::ZERO);
        assert_eq!(verdict.validity, Validity::Unknown, "{verdict:#?}");
        assert!(
            verdict.summary.contains("time budget"),
            "{}",
            verdict.summary
        );
    }

    /// `writers` concurrent writes stay open while reads see 1, 2, then 1
    /// again: not linearizable, but only after trying every subset of the
    /// other writes.
    fn flip_flop_under_writes(writers: u64) -> History {
        let mut history = History::default();
        for writer in 1..=writers {
            history.invoke(writer, write("x", writer as i64));
        }
        history
            .op(100, OpType::Ok, read("x", Some(1)))
            .op(100, OpType::Ok, read("x", Some(2)))
            .op(100, OpType::Ok, read("x", Some(1)));
        for writer in 1..=writers {
            history.complete(writer, OpType::Ok, write("x", writer as i64));
        }
        history
    }

    #[test]
    fn hard_history_small_budget_unknown() {
        assert_anomaly(&flip_flop_under_writes(8).check(), "not linearizable");

        let started = Instant::now();
        let verdict = check(&flip_flop_under_writes(40).ops, Duration::from_millis(50));
        assert_eq!(verdict.validity, Validity::Unknown, "{verdict:#?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn hard_history_memo_limit_gives_up() {
        let history = flip_flop_under_writes(40);
        let keys = split_by_key(&history.ops).expect("hand-made history is well formed");
        let outcome = search(&keys["x"].ops, Instant::now() + BUDGET, 1 << 20);
        assert!(
            matches!(outcome, SearchOutcome::GaveUp(Limit::Memory)),
            "{outcome:?}"
        );
    }

    #[test]
    fn many_keys_checked_in_parallel() {
        let spec = Spec {
            processes: 5,
            ops: 3000,
            keys: 40,
            value_range: Some(6),
            indeterminate_rate: 0.05,
            fault: Fault::None,
        };
        let verdict = check(&generate(11, spec), BUDGET);
        assert_valid(&verdict);
        assert_eq!(verdict.counts[1].value, 40, "{verdict:#?}");
    }
}
