//! The exports target sessions see: every volume read-write under its own name.

use tessel_engine::Engine;
use tessel_targets::export::{ExportInfo, Exports};

/// Exports backed by the engine's volume table.
pub struct EngineExports {
    pub engine: Engine,
}

impl Exports for EngineExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.engine
            .volumes()
            .into_iter()
            .map(|v| ExportInfo {
                description: format!(
                    "tessel volume {} ({} bytes, {}-byte blocks)",
                    v.name, v.size, v.block_size
                ),
                name: v.name,
                volume: v.id,
                size: v.size,
                block_size: v.block_size,
                read_only: false,
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.list().into_iter().find(|e| e.name == name)
    }
}
