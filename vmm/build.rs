//! Builds the guest agent and hands its ELF image to the crate as
//! `APF_AGENT_ELF`. The agent is a workspace of its own (it needs
//! `panic = "abort"` and link arguments no host crate may see), built by a
//! nested cargo with its own target directory and none of this build's
//! settings.

use std::env;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

/// The only target installed; the agent is a bare-metal image built for it.
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let agent = manifest_dir.parent().expect("the VMM crate lives in the workspace").join("guest-agent");
    let target_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("agent-target");

    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // From the agent's directory: cargo reads `.cargo/config.toml` (the
    // static relocation model) from where it runs.
    cargo
        .current_dir(&agent)
        .args(["build", "--release", "--offline", "--locked", "--target", TARGET])
        .arg("--manifest-path")
        .arg(agent.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        if leaks(&key) {
            cargo.env_remove(key);
        }
    }
    let output = cargo.output().unwrap_or_else(|e| panic!("cannot run cargo to build the guest agent: {e}"));
    if !output.status.success() {
        for stream in [&output.stdout, &output.stderr].into_iter().filter(|s| !s.is_empty()) {
            eprintln!("{}", String::from_utf8_lossy(stream));
        }
        panic!("building the guest agent in {} failed ({}); its cargo output is above", agent.display(), output.status);
    }

    let elf = target_dir.join(TARGET).join("release").join("guest-agent");
    assert!(elf.is_file(), "the guest agent built but {} is missing", elf.display());
    println!("cargo:rustc-env=APF_AGENT_ELF={}", elf.display());
    for path in ["src", "build.rs", "Cargo.toml", "Cargo.lock", ".cargo/config.toml", "proto/src", "proto/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", agent.join(path).display());
    }
}

/// Whether the variable `key` of this build would leak into the agent's.
/// Cargo takes configuration from `CARGO_*` (target directory, profiles,
/// target and rustflags), the `RUSTFLAGS` family and the wrappers (clippy
/// sets `RUSTC_WORKSPACE_WRAPPER`); the rest describe the VMM's build, not
/// the agent's. Kept: where cargo lives (`CARGO_HOME`), the jobserver
/// (`CARGO_MAKEFLAGS`), and `RUSTC`, so both builds use one compiler.
fn leaks(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    match key {
        "CARGO_HOME" | "CARGO_MAKEFLAGS" => false,
        "RUSTFLAGS"
        | "RUSTDOCFLAGS"
        | "RUSTC_WRAPPER"
        | "RUSTC_WORKSPACE_WRAPPER"
        | "RUSTC_LINKER"
        | "CLIPPY_ARGS"
        | "CLIPPY_CONF_DIR"
        | "TARGET"
        | "HOST"
        | "OUT_DIR"
        | "PROFILE"
        | "OPT_LEVEL"
        | "DEBUG"
        | "NUM_JOBS" => true,
        _ => key.starts_with("CARGO_") || key.starts_with("__CARGO") || key.starts_with("DEP_"),
    }
}
