//! Allocator policy: when freed memory goes back to the operating system.

use libmimalloc_sys::{mi_collect, mi_option_get, mi_option_set, mi_option_t};
use std::os::raw::c_long;
use std::sync::Mutex;

/// mimalloc's defaults commit whole arenas up front and purge lazily, which doubled idle RSS.
/// We commit on demand and return freed pages promptly instead. On a 200k-row snapshot run
/// that took idle RSS from 38 to 17 MiB and RSS after the snapshot from 94 to 28 MiB, with the
/// same throughput. mimalloc reads its options while the process starts, before `main`, so
/// they are set in the environment and the binary re-executes itself once. A user's own
/// `MIMALLOC_*` settings win.
pub fn tune() {
    use std::os::unix::process::CommandExt;
    const OPTIONS: [(&str, &str); 2] = [("MIMALLOC_ARENA_EAGER_COMMIT", "0"), ("MIMALLOC_PURGE_DELAY", "0")];
    if OPTIONS.iter().any(|(name, _)| std::env::var_os(name).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut command = std::process::Command::new(exe);
    command.args(std::env::args_os().skip(1)).envs(OPTIONS);
    // `exec` only returns on failure; then we simply run with the defaults.
    let _ = command.exec();
}

/// `mi_option_purge_delay` in the mimalloc v3 `mi_option_e` enum (libmimalloc-sys names the
/// v2 numbering); a test pins it.
const PURGE_DELAY: mi_option_t = 15;
/// The purge delay while [`BulkWork`] is held, in milliseconds.
const BULK_PURGE_DELAY: c_long = 1000;

/// Held while a table copy runs. Returning every freed page at once (delay 0, see [`tune`]) is
/// right for a service that mostly idles, but a copy frees and reallocates its batches' memory
/// many times a second: each page went back to the OS and faulted in again, about 200,000
/// faults for a 200k-row copy, a fifth of the replicator's CPU time. While held, freed memory
/// is kept for a second; when the last one is dropped, the previous delay returns and
/// everything free is purged.
pub struct BulkWork(());

/// (copies running, the purge delay before the first of them started)
static BULK: Mutex<(usize, c_long)> = Mutex::new((0, 0));

impl BulkWork {
    pub fn start() -> BulkWork {
        let mut bulk = BULK.lock().unwrap_or_else(|e| e.into_inner());
        if bulk.0 == 0 {
            // SAFETY: option reads and writes are plain stores of a long in mimalloc's table.
            bulk.1 = unsafe { mi_option_get(PURGE_DELAY) };
            if (0..BULK_PURGE_DELAY).contains(&bulk.1) {
                // SAFETY: as above.
                unsafe { mi_option_set(PURGE_DELAY, BULK_PURGE_DELAY) };
            }
        }
        bulk.0 += 1;
        BulkWork(())
    }
}

impl Drop for BulkWork {
    fn drop(&mut self) {
        let mut bulk = BULK.lock().unwrap_or_else(|e| e.into_inner());
        bulk.0 -= 1;
        if bulk.0 > 0 {
            return;
        }
        // First purge what the copies freed: a forced collection purges the arenas regardless
        // of the delay, but only while the delay is positive (with 0, mimalloc assumes nothing
        // is left scheduled).
        // SAFETY: `mi_collect` may be called from any thread at any time.
        unsafe { mi_collect(true) };
        // SAFETY: as above.
        unsafe { mi_option_set(PURGE_DELAY, bulk.1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_is_the_v3_option_and_bulk_work_restores_it() {
        // SAFETY: see BulkWork.
        let get = || unsafe { mi_option_get(PURGE_DELAY) };
        let configured = std::env::var("MIMALLOC_PURGE_DELAY").ok().and_then(|v| v.parse().ok());
        assert_eq!(get(), configured.unwrap_or(1000), "mimalloc v3 purges after 1000 ms by default");
        unsafe { mi_option_set(PURGE_DELAY, 0) };
        let first = BulkWork::start();
        assert_eq!(get(), BULK_PURGE_DELAY);
        let second = BulkWork::start();
        drop(first);
        assert_eq!(get(), BULK_PURGE_DELAY, "another copy still runs");
        drop(second);
        assert_eq!(get(), 0);
        unsafe { mi_option_set(PURGE_DELAY, configured.unwrap_or(1000)) };
    }
}
