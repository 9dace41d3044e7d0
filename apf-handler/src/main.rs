//! `apf-handler`: serves Firecracker snapshot restores from one memory
//! file on one socket (see the crate doc and `server`'s module doc).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    apf_handler::cli::handler_main(&args)
}
