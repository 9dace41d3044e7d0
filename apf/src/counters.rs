//! The engine's counters: monotonic, relaxed, only ever added to, and read
//! as one [`StatsSnapshot`]. A leaf: the layers above count, nothing here
//! knows them.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter. The layers above may add to it and nothing else: no store,
/// no reset, so a snapshot never goes backwards.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        /// Counters the engine keeps: each one only ever added to.
        #[derive(Debug, Default)]
        pub(crate) struct $name { $(pub(crate) $field: Counter,)* }

        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snap { $($(#[$fm])* pub $field: u64,)* }

        impl $name {
            /// A consistent-enough copy of every counter.
            pub(crate) fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.get(),)* }
            }
        }

        impl $snap {
            /// The counters as one JSON object.
            pub fn to_json(&self) -> String {
                let fields: Vec<String> = vec![$(format!("\"{}\":{}", stringify!($field), self.$field)),*];
                format!("{{{}}}", fields.join(","))
            }
        }
    };
}

counters! {
    /// A copy of the engine's counters.
    Stats / StatsSnapshot {
        /// Fault events read.
        faults,
        /// Faults on a page another resolver had claimed.
        deduped,
        /// Faults on a page already present (stale events).
        spurious,
        /// Windows installed (one or more pages each).
        windows,
        /// Pages installed by COPY or ZEROPAGE.
        pages_installed,
        /// Bytes installed.
        bytes_installed,
        /// Pages installed with ZEROPAGE.
        zero_pages,
        /// Pages found already present mid-install (`EEXIST`).
        eexist,
        /// Installs the kernel refused while the address space changed.
        eagain,
        /// Fills or installs thrown away because an invalidation ran.
        stale,
        /// Fill attempts retried after a source error.
        fill_retries,
        /// Pages poisoned because their source failed.
        poisoned,
        /// Remove events (`MADV_DONTNEED` by someone else).
        removes,
        /// Windows resolved on the event-loop thread.
        inline,
        /// Windows handed to the worker pool.
        dispatched,
        /// Windows parked because the worker queue was full.
        parked,
        /// Errors dropped because the error channel was full.
        errors_dropped,
        /// Faults on pages an offline held, answered when it ended.
        deferred,
        /// Offlines completed (every mode).
        offlines,
        /// Offlines that hit their deadline (held by a hard pin, a
        /// short-term reference, or a kernel pin) and changed nothing.
        offline_busy,
        /// Pages migrated to new host frames.
        frames_moved,
        /// Pages moved to the eviction store.
        pages_evicted,
        /// Pages unplugged (contents discarded).
        pages_unplugged,
        /// Pin callbacks called by invalidations.
        pin_invalidations,
        /// Pins re-armed (faulted in again) after an invalidation.
        pin_refaults,
        /// Pages working-set replays installed.
        replayed_pages,
        /// Offlining threads a waiter raised to the priority ceiling
        /// ([`crate::OfflinePriority`]). Kept by the notifier.
        priority_raises,
        /// Raises the kernel refused (no `CAP_SYS_NICE`): those offlines
        /// ran at their own priority. Kept by the notifier.
        priority_raises_refused,
        /// Pages mapped in place from an image's page cache (`CONTINUE`),
        /// counted in `pages_installed` too.
        continued,
        /// Pages of shared memory found in the page cache when the engine
        /// came to fill them (a discard that kept them): present, nothing
        /// installed.
        cached,
        /// Write-protect faults read: writes an offline of memory without
        /// `MOVE` held while it copied their pages.
        write_protect_faults,
        /// Installs the kernel had no page for (`ENOMEM`: a huge-page pool
        /// mapped `MAP_NORESERVE` ran dry).
        no_memory,
        /// Times the embedder's refill
        /// ([`EngineBuilder::on_no_memory`](crate::EngineBuilder::on_no_memory))
        /// added pages to a pool an install had found dry.
        pool_refills,
        /// Page states pins and references checked while faulting their
        /// ranges in, in the ranges' own pages (huge pages on huge-page
        /// memory): the work a pin's set-up costs.
        pin_pages_checked,
    }
}
