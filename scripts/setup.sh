#!/usr/bin/env bash
# Installs the Debian packages that ccs needs to build and test, if any is
# missing. They are libvirt (the test driver and the headers of the `virt`
# crate), clang for RocksDB's bindings, protoc for the gRPC code, the
# network tools of the multi-host tests, and for ccs-jepsen: libfaketime
# (clock faults).
set -euo pipefail

packages=(libvirt-dev libvirt0 libclang-dev clang pkg-config protobuf-compiler
          iproute2 iptables ca-certificates faketime)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust 1.88 or newer (rustup) and run this again" >&2
    exit 1
fi
