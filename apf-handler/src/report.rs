//! What the handler says about each VM when it ends: a [`VmReport`] (one
//! JSON line), built from the engine's counters, the latency layer's
//! histograms and a [`Timeline`] of served faults.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// When faults were served: the first two and the last (a
/// `tracing-subscriber` layer on the engine's `apf.fault` spans, which
/// close once their fault is resolved).
#[derive(Debug, Clone, Default)]
pub struct Timeline(Arc<Mutex<Served>>);

#[derive(Debug, Default)]
struct Served {
    first: Vec<Instant>,
    last: Option<Instant>,
}

impl Timeline {
    /// From `since` to the first, the second and the last fault served.
    pub fn since(&self, since: Instant) -> (Option<Duration>, Option<Duration>, Option<Duration>) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let d = |t: Option<&Instant>| t.map(|t| t.saturating_duration_since(since));
        (d(s.first.first()), d(s.first.get(1)), d(s.last.as_ref()))
    }
}

impl<S> Layer<S> for Timeline
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if ctx.metadata(&id).is_some_and(|m| m.name() == apf::span::FAULT) {
            let now = Instant::now();
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.first.len() < 2 {
                s.first.push(now);
            }
            s.last = Some(now);
        }
    }
}

/// Why a VM's engine stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer closed the connection (it exited, or it is done).
    HungUp,
    /// The descriptor answered `ESRCH`: the peer's address space is gone.
    Esrch,
    /// The handler ended the peer through its pidfd, for this reason.
    Killed(String),
    /// The handler is shutting down.
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::HungUp => write!(f, "hung up"),
            End::Esrch => write!(f, "ESRCH"),
            End::Killed(why) => write!(f, "peer ended: {why}"),
            End::Shutdown => write!(f, "handler shut down"),
        }
    }
}

/// One VM's report.
#[derive(Debug, Clone)]
pub struct VmReport {
    /// The VM's number on this handler (connection order).
    pub vm: u64,
    /// The peer's pid at connect time.
    pub pid: i32,
    /// Why it ended.
    pub end: End,
    /// Bytes of guest memory described by its handshake.
    pub memory_bytes: u64,
    /// The engine's counters.
    pub stats: apf::StatsSnapshot,
    /// `apf.fault` latency, if any fault closed.
    pub fault_latency: Option<apf::SpanStats>,
    /// From the connection to the first and second fault served, and to
    /// the last.
    pub first_fault: Option<Duration>,
    /// See `first_fault`.
    pub second_fault: Option<Duration>,
    /// See `first_fault`.
    pub last_fault: Option<Duration>,
    /// Failures the engine reported.
    pub errors: Vec<String>,
    /// What the VM did with working sets.
    pub working_set: WorkingSetUse,
}

/// A VM's working sets: the one replayed into it, the one recorded from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSetUse {
    /// The file replayed (or refused).
    pub file: Option<String>,
    /// Pages in the set replayed (0 when refused).
    pub pages: u64,
    /// Why the set was not replayed: the VM was served without replay.
    pub error: Option<String>,
    /// The file its recording was written to.
    pub saved: Option<String>,
    /// Pages in that recording.
    pub saved_pages: u64,
    /// Why its recording was not written.
    pub save_error: Option<String>,
}

fn ms(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| serde_json::json!(d.as_secs_f64() * 1e3))
}

impl VmReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let latency = self.fault_latency.as_ref().map_or(serde_json::Value::Null, |l| {
            serde_json::json!({"count": l.count, "p50_us": us(l.p50), "p90_us": us(l.p90), "p99_us": us(l.p99),
                "p999_us": us(l.p999), "max_us": us(l.max)})
        });
        serde_json::json!({
            "vm": self.vm,
            "pid": self.pid,
            "end": self.end.to_string(),
            "memory_bytes": self.memory_bytes,
            "faults": self.stats.faults,
            "pages": self.stats.pages_installed,
            "bytes": self.stats.pages_installed * apf::PAGE_SIZE as u64,
            "removes": self.stats.removes,
            "fault_latency": latency,
            "ms_to_first_fault_served": ms(self.first_fault),
            "ms_to_second_fault_served": ms(self.second_fault),
            "ms_to_last_fault": ms(self.last_fault),
            "errors": self.errors,
            "working_set": {
                "file": self.working_set.file,
                "pages": self.working_set.pages,
                "replayed_pages": self.stats.replayed_pages,
                "error": self.working_set.error,
                "saved": self.working_set.saved,
                "saved_pages": self.working_set.saved_pages,
                "save_error": self.working_set.save_error,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn the_timeline_keeps_the_first_two_and_the_last_fault() {
        let start = Instant::now();
        let timeline = Timeline::default();
        assert_eq!(timeline.since(start), (None, None, None));
        let subscriber = tracing_subscriber::registry().with(timeline.clone());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                drop(tracing::info_span!(target: "apf", "apf.fault").entered());
                drop(tracing::info_span!(target: "apf", "apf.fill").entered());
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let (a, b, c) = timeline.since(start);
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert!(c - a >= Duration::from_millis(4), "the last is the third fault, not the second");
    }
}
