//! Links the agent as a static image at the address the VMM loads it, and
//! fails the link if the image would not end below `AGENT_LIMIT`.

use std::path::PathBuf;
use std::{env, fs};

use agent_proto::{AGENT_LIMIT, AGENT_LOAD};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("agent.ld");
    fs::write(&script, linker_script()).expect("write the linker script");
    let script = format!("-Wl,-T,{}", script.display());
    let image_base = format!("-Wl,--image-base={AGENT_LOAD:#x}");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        &image_base,
        "-Wl,--build-id=none",
        // Nothing to protect after relocation: there is none.
        "-Wl,-z,norelro",
        // The script drops the unwind tables: `panic = "abort"`.
        "-Wl,--no-eh-frame-hdr",
        &script,
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// Code, then read-only data, then data, from `AGENT_LOAD` on; no notes
/// (a loader may read a note segment as a boot protocol) and no unwind
/// tables. Each part starts on a page of its own so that its segment does.
fn linker_script() -> String {
    format!(
        "ENTRY(_start)
SECTIONS
{{
    . = {AGENT_LOAD:#x};
    .text : {{ *(.text._start) *(.text .text.*) }}
    . = ALIGN(0x1000);
    .rodata : {{ *(.rodata .rodata.*) }}
    . = ALIGN(0x1000);
    .data : {{ *(.data .data.*) *(.got .got.*) }}
    .bss : {{ *(.bss .bss.*) *(COMMON) }}
    /DISCARD/ : {{ *(.eh_frame .eh_frame_hdr .note .note.* .comment) }}
}}
ASSERT(. <= {AGENT_LIMIT:#x}, \"the agent image does not end below AGENT_LIMIT\")
"
    )
}
