//! The `tessel` binary: parses the command line and runs the daemon or one admin command.

use std::process::ExitCode;

use clap::Parser;

use tessel::cli::{Cli, Command};
use tessel::{admin, serve};

fn main() -> ExitCode {
    tessel_engine::avoid_huge_page_faults();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match &cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Pool(p) => admin::pool(p, cli.json),
        command => {
            // Admin output piped into `head` and the like: end quietly when the reader goes.
            // SAFETY: restores the default disposition before any other thread exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            admin::run(command, &cli.socket, cli.json).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessel: {e}");
            ExitCode::FAILURE
        }
    }
}
