//! `apf-fc-client`: does what Firecracker does with its page-fault
//! handler (see `apf_handler::client`), or misbehaves one way. Prints its
//! report as one JSON line; exits non-zero on any failure.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    apf_handler::cli::client_main(&args)
}
