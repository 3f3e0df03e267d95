//! The `tessel` binary: parses the command line and runs the daemon or one admin command.

use std::process::ExitCode;

use clap::Parser;

use tessel::cli::{Cli, Command};
use tessel::{admin, serve};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match &cli.command {
        Command::Serve(args) => serve::run(args),
        command => admin::run(command, &cli.socket, cli.json).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessel: {e}");
            ExitCode::FAILURE
        }
    }
}
