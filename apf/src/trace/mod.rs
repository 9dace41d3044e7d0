//! Tracing plumbing: engine threads report to the dispatcher current where
//! the engine started; with the `lab` feature, [`LatencyLayer`] and its
//! plot (the span names are in [`crate::span`]).

#[cfg(feature = "lab")]
mod latency;
#[cfg(feature = "lab")]
mod svg;

#[cfg(feature = "lab")]
pub use latency::{LatencyLayer, LatencySummary, SpanStats, TraceWritten, VcpuBlocked};
#[cfg(feature = "lab")]
pub use svg::latency_plot;

/// The dispatcher current on this thread, for threads the engine starts.
pub(crate) fn current_dispatch() -> tracing::Dispatch {
    tracing::dispatcher::get_default(|d| d.clone())
}
