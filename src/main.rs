//! tessel: the daemon (`tessel serve`) and the admin commands that talk to it.

mod config;
mod size;

fn main() {}
