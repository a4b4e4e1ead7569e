//! Builds the XDP objects of `switcher-ebpf` with the pinned nightly and bpf-linker, so that
//! `cargo build` alone produces a binary with the current program embedded: `switcher` (the
//! daemon's) and `switcher-bench` (the benchmarks' own programs; only the bench embeds it).
//! `AYA_BUILD_SKIP=1` skips them (lint-only builds); the binary then refuses to load with a
//! clear error.

/// The nightly that builds the eBPF crate; `./x` installs it with `rust-src`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-09-01";

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "switcher-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../switcher-ebpf"),
        ..Default::default()
    };
    // `cargo::rerun-if-changed` on the common crate too: the program embeds its types.
    println!("cargo::rerun-if-changed={}/../switcher-common", env!("CARGO_MANIFEST_DIR"));
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))?;
    for object in ["switcher", "switcher-bench"] {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join(object);
        if !out.exists() {
            // AYA_BUILD_SKIP: an empty object keeps `include_bytes_aligned!` compiling.
            std::fs::write(&out, [])?;
        }
    }
    Ok(())
}
