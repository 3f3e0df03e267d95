//! `tessel serve`: the daemon.

use crate::cli::ServeArgs;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let _ = args;
    Err("not implemented yet".into())
}
