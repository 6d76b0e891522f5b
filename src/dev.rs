//! Placeholder for `ccs dev` until the launcher lands; helper-1 replaces this file.
pub struct DevOptions {
    pub data_dir: std::path::PathBuf,
    pub demo: Option<usize>,
    pub base_port: u16,
    pub trace: std::path::PathBuf,
    pub speedup: f64,
}

pub async fn run(_options: DevOptions) -> anyhow::Result<()> {
    anyhow::bail!("ccs dev is not built yet")
}
