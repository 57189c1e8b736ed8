//! The `afprobe` binary: parses the command line ([`afprobe::cli`]) and
//! reports errors; the work is in the `afprobe` library.

use std::process::ExitCode;

fn main() -> ExitCode {
    afprobe::model::keep_freed_memory();
    match afprobe::cli::Cli::run_from_args() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
