//! tessel: the daemon (`tessel serve`), its configuration, and the admin commands that talk
//! to it over the control socket. A library too, so integration tests reuse the config and
//! size parsers.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod serve;
pub mod size;
pub mod table;
