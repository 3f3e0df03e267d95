//! `tessel serve`: logging setup, then the daemon (src/daemon/).

use crate::cli::{LogFormat, ServeArgs};
use tracing_subscriber::EnvFilter;

/// Runs the daemon until SIGTERM or SIGINT (or a control `shutdown`).
pub fn run(args: &ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = args.config()?;
    let level = args
        .log_level
        .clone()
        .unwrap_or_else(|| config.engine.log_level.clone());
    let filter = EnvFilter::try_new(&level).map_err(|e| format!("log level '{level}': {e}"))?;
    // Colour only for a person at a terminal: escape codes in a journal or a log file are
    // noise (and break grep).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    crate::daemon::run(config)
}
