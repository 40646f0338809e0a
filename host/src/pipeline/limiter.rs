//! What one guest store may take from the host: memory in total, not per memory.
//!
//! Invariants:
//! - The linear memories of one store together stay within the configured memory
//!   limit (wasmtime's own `StoreLimits` bounds each memory alone, and allows 10,000
//!   of them). Tables hold at most [`TABLE_ELEMENTS`] elements in total.
//! - A store holds at most [`INSTANCES`] core instances, [`MEMORIES`] memories and
//!   [`TABLES`] tables: enough for components of any language toolchain (Python's
//!   has about a dozen instances), far from what would cost the host.
//! - The WASI resource table holds at most [`RESOURCES`] entries: handles a guest
//!   opens without closing fail the call instead of growing host memory.
//! - Growth past a limit traps the call (the instance is then discarded), with a
//!   message naming the limit.

/// Core instances per store.
pub const INSTANCES: usize = 64;
/// Linear memories per store.
pub const MEMORIES: usize = 16;
/// Tables per store.
pub const TABLES: usize = 64;
/// Table elements per store, all tables together (8 bytes or more each).
pub const TABLE_ELEMENTS: usize = 1 << 20;
/// Entries in a store's WASI resource table (streams, pollables, the batch).
pub const RESOURCES: usize = 4096;

/// Counts what a store's memories and tables have grown to.
#[derive(Debug)]
pub struct GuestLimiter {
    memory_limit: usize,
    memory: usize,
    table_elements: usize,
}

impl GuestLimiter {
    /// A limiter for a store whose memories may hold `memory_limit` bytes in total.
    pub fn new(memory_limit: usize) -> GuestLimiter {
        GuestLimiter {
            memory_limit,
            memory: 0,
            table_elements: 0,
        }
    }
}

impl wasmtime::ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory.saturating_add(desired.saturating_sub(current));
        if total > self.memory_limit {
            wasmtime::bail!(
                "memory limit: growing a memory to {desired} bytes would make the guest's \
                 memories {total} bytes in all, over its limit of {} bytes",
                self.memory_limit
            );
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .table_elements
            .saturating_add(desired.saturating_sub(current));
        if total > TABLE_ELEMENTS {
            wasmtime::bail!(
                "table limit: growing a table to {desired} elements would make the guest's \
                 tables {total} elements in all, over the limit of {TABLE_ELEMENTS}"
            );
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        INSTANCES
    }

    fn tables(&self) -> usize {
        TABLES
    }

    fn memories(&self) -> usize {
        MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter as _;

    #[test]
    fn memories_count_together_against_the_limit() {
        let mut limiter = GuestLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        // A second memory of 60 would pass a per-memory limit of 100; not the total.
        let error = limiter.memory_growing(0, 60, None).unwrap_err().to_string();
        assert!(
            error.contains("memory limit") && error.contains("120"),
            "{error}"
        );
        assert!(limiter.memory_growing(60, 100, None).unwrap());
        assert!(limiter.memory_growing(0, 1, None).is_err());
    }

    #[test]
    fn tables_count_together_against_the_limit() {
        let mut limiter = GuestLimiter::new(0);
        assert!(limiter.table_growing(0, TABLE_ELEMENTS, None).unwrap());
        assert!(limiter.table_growing(0, 1, None).is_err());
    }
}
