//! [`LatencyLayer`]: span durations into HDR histograms, per span name and
//! per vCPU, blocked time per vCPU, and an optional bounded trace of recent
//! spans for Perfetto.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::span::{FAULT, SPANS};

/// Longest duration a histogram holds (longer ones are clamped): one hour.
const MAX_NS: u64 = 3_600_000_000_000;

fn histogram() -> Histogram<u64> {
    // Three significant digits: 0.1% resolution at every scale.
    Histogram::new_with_bounds(1, MAX_NS, 3).unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// The `apf.fault` fields that say where a slow fault's time went, in the
/// order of [`TailBreakdown::causes`].
const CAUSES: [&str; 6] = ["deferred_ns", "queued_ns", "waited_ns", "lock_ns", "fill_ns", "install_ns"];

/// Slowest faults kept with their causes for [`TailBreakdown`].
const TAIL_KEEP: usize = 2048;

/// A closed fault: its duration and the nanoseconds of each of [`CAUSES`].
type SlowFault = (u64, [u64; CAUSES.len()]);

/// What the layer keeps in a span's extensions.
struct Timing {
    start: Instant,
    /// `tid` of a fault span: the faulting thread.
    fault_tid: Option<u64>,
    /// The thread that opened the span (trace lanes only).
    thread: u64,
    /// `outcome` and `gpa`, kept only when tracing to a file.
    outcome: Option<String>,
    gpa: Option<u64>,
    /// Nanoseconds per entry of [`CAUSES`] (fault spans only).
    causes: [u64; CAUSES.len()],
}

#[derive(Default)]
struct Fields {
    tid: Option<u64>,
    outcome: Option<String>,
    gpa: Option<u64>,
    keep_details: bool,
    causes: [Option<u64>; CAUSES.len()],
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "tid" => self.tid = Some(value),
            "gpa" if self.keep_details => self.gpa = Some(value),
            name => {
                if let Some(i) = CAUSES.iter().position(|c| *c == name) {
                    self.causes[i] = Some(value);
                }
            }
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.keep_details && field.name() == "outcome" {
            self.outcome = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

#[derive(Debug)]
struct VcpuAcc {
    faults: u64,
    blocked_ns: u64,
    hist: Histogram<u64>,
}

/// One span in the trace buffer.
#[derive(Debug, Clone)]
struct TraceEvent {
    name: &'static str,
    start_ns: u64,
    dur_ns: u64,
    lane: u64,
    outcome: Option<String>,
    gpa: Option<u64>,
}

#[derive(Debug)]
struct TraceBuf {
    events: VecDeque<TraceEvent>,
    capacity: usize,
    dropped: u64,
    thread_names: HashMap<u64, String>,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    vcpus: RwLock<HashMap<u64, u32>>,
    /// One histogram per name in [`SPANS`], each behind its own lock: the
    /// event loop and the workers close different spans at once.
    spans: [Mutex<Histogram<u64>>; SPANS.len()],
    per_vcpu: Mutex<HashMap<u32, VcpuAcc>>,
    unattributed_faults: AtomicU64,
    unattributed_ns: AtomicU64,
    /// The slowest faults with their causes: a min-heap on duration.
    tail: Mutex<BinaryHeap<Reverse<SlowFault>>>,
    /// The shortest fault in a full `tail` (a fault no longer than it is
    /// not kept: checked without the lock).
    tail_floor: AtomicU64,
    trace: Option<Mutex<TraceBuf>>,
}

/// A `tracing-subscriber` layer that aggregates the engine's spans (target
/// `apf`) into HDR histograms per span name and per vCPU, and adds up the
/// time each vCPU spent waiting for its faults (what QEMU reports as
/// post-copy blocktime).
///
/// Latency is measured from the moment the engine reads a fault from the
/// userfaultfd to the wake: time in the kernel before that read is not
/// seen, so blocked time is a lower bound. A fault is attributed to a vCPU
/// through the thread id userfaultfd reports and the map
/// [`Self::register_vcpu`] fills. When KVM resolves a guest fault from a
/// kernel worker instead of the vCPU thread (asynchronous page faults,
/// which need an in-kernel interrupt controller and a guest that accepts
/// them), the reported thread is that worker: the fault counts as
/// unattributed, and the vCPU, which went on running something else, was
/// not blocked by it.
///
/// Cheap enough to leave on: per span, one timestamp and one extension at
/// creation, one histogram update at close. Clones share their data.
///
/// ```
/// use apf::LatencyLayer;
/// use tracing_subscriber::prelude::*;
/// let layer = LatencyLayer::new();
/// let subscriber = tracing_subscriber::registry().with(layer.clone());
/// tracing::subscriber::with_default(subscriber, || {
///     // Start the engine here: its threads report to this subscriber.
///     let _span = tracing::info_span!(target: "apf", "apf.fault", tid = 7u64).entered();
/// });
/// assert_eq!(layer.summary().spans[0].count, 1);
/// ```
#[derive(Debug, Clone)]
pub struct LatencyLayer {
    inner: Arc<Inner>,
}

impl Default for LatencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency of one span name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanStats {
    /// The span name (`apf.fault`...).
    pub name: &'static str,
    /// Spans closed.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Longest.
    pub max: Duration,
    /// Sum of all durations.
    pub total: Duration,
}

/// How long one vCPU waited for its faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuBlocked {
    /// The vCPU.
    pub vcpu: u32,
    /// Faults attributed to it.
    pub faults: u64,
    /// Sum of their `apf.fault` spans.
    pub blocked: Duration,
    /// Their 99th percentile.
    pub p99: Duration,
}

/// What a [`LatencyLayer`] has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Per span name that occurred, in [`crate::span::SPANS`] order.
    pub spans: Vec<SpanStats>,
    /// Per vCPU registered, in vCPU order.
    pub vcpus: Vec<VcpuBlocked>,
    /// Faults from threads no vCPU is registered for (the VMM's own
    /// threads, or kernel workers resolving asynchronous page faults).
    pub unattributed_faults: u64,
    /// Their summed span time.
    pub unattributed_blocked: Duration,
    /// Where the slowest faults' time went; `None` before any fault.
    pub tail: Option<TailBreakdown>,
}

/// Where the time of the slowest faults went: the slowest 0.1% of the
/// `apf.fault` spans (at least one, at most 2,048), their time split by
/// cause. Faults shorter than 50 µs record no causes (their time counts
/// as `other`); tails worth explaining are far longer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailBreakdown {
    /// Faults in the tail.
    pub faults: u64,
    /// The shortest of them: about the 99.9th percentile.
    pub from: Duration,
    /// Their summed span time.
    pub total: Duration,
    /// Their summed time per cause, which add up to `total`:
    /// - `deferred`: the fault waited behind an offline holding its page;
    /// - `queued`: its job waited for a worker;
    /// - `waited`: its resolver waited for an invalidation over its window;
    /// - `lock`: waiting for the install lock (an offline or a remove
    ///   event holds it exclusively);
    /// - `fill`: filling the window from its origin;
    /// - `install`: the install ioctls (copying the window in);
    /// - `other`: the rest: the event loop's own work and wakes, and the
    ///   scheduler's delays between the steps above.
    pub causes: Vec<(&'static str, Duration)>,
}

impl TailBreakdown {
    /// The summed time of cause `name`.
    pub fn cause(&self, name: &str) -> Option<Duration> {
        self.causes.iter().find(|(n, _)| *n == name).map(|&(_, d)| d)
    }
}

impl LatencySummary {
    /// The stats of span `name`, if any closed.
    pub fn span(&self, name: &str) -> Option<&SpanStats> {
        self.spans.iter().find(|s| s.name == name)
    }
}

/// What [`LatencyLayer::write_chrome_trace`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceWritten {
    /// Events written.
    pub events: usize,
    /// Older events dropped because the buffer was full.
    pub dropped: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn thread_id() -> u64 {
    rustix::thread::gettid().as_raw_nonzero().get() as u64
}

impl LatencyLayer {
    /// A layer with histograms only.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A layer that also keeps the most recent `capacity` spans for
    /// [`Self::write_chrome_trace`].
    pub fn with_trace(capacity: usize) -> Self {
        Self::build(Some(capacity.max(1)))
    }

    fn build(trace: Option<usize>) -> Self {
        // With a single registered dispatcher, tracing computes a callsite's
        // interest from whatever dispatcher is current on the thread that
        // hits it first: a thread with no subscriber (another engine in the
        // same process) would switch the engine's spans off for this layer
        // too. A second, idle dispatcher kept for the life of the process
        // makes tracing ask every live dispatcher instead.
        static IDLE: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        IDLE.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::new()));
        let trace = trace.map(|capacity| {
            Mutex::new(TraceBuf {
                events: VecDeque::with_capacity(capacity.min(1 << 16)),
                capacity,
                dropped: 0,
                thread_names: HashMap::new(),
            })
        });
        LatencyLayer {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                vcpus: RwLock::new(HashMap::new()),
                spans: std::array::from_fn(|_| Mutex::new(histogram())),
                per_vcpu: Mutex::new(HashMap::new()),
                unattributed_faults: AtomicU64::new(0),
                unattributed_ns: AtomicU64::new(0),
                tail: Mutex::new(BinaryHeap::with_capacity(TAIL_KEEP + 1)),
                tail_floor: AtomicU64::new(0),
                trace,
            }),
        }
    }

    /// Says that kernel thread `tid` runs vCPU `vcpu`: its faults count
    /// towards that vCPU. Call it from the vCPU thread with
    /// [`Self::register_current_vcpu`], or with a known tid.
    pub fn register_vcpu(&self, tid: u64, vcpu: u32) {
        self.inner.vcpus.write().unwrap_or_else(|e| e.into_inner()).insert(tid, vcpu);
        self.inner.per_vcpu.lock().unwrap_or_else(|e| e.into_inner()).entry(vcpu).or_insert_with(|| VcpuAcc {
            faults: 0,
            blocked_ns: 0,
            hist: histogram(),
        });
        if let Some(trace) = &self.inner.trace {
            trace.lock().unwrap_or_else(|e| e.into_inner()).thread_names.insert(tid, format!("vcpu{vcpu}"));
        }
    }

    /// [`Self::register_vcpu`] for the calling thread.
    pub fn register_current_vcpu(&self, vcpu: u32) {
        self.register_vcpu(thread_id(), vcpu);
    }

    /// Everything seen so far.
    pub fn summary(&self) -> LatencySummary {
        let d = |ns: u64| Duration::from_nanos(ns);
        let mut out = LatencySummary::default();
        for (name, h) in SPANS.iter().zip(&self.inner.spans) {
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            if !h.is_empty() {
                let name = *name;
                out.spans.push(SpanStats {
                    name,
                    count: h.len(),
                    p50: d(h.value_at_quantile(0.5)),
                    p90: d(h.value_at_quantile(0.9)),
                    p99: d(h.value_at_quantile(0.99)),
                    p999: d(h.value_at_quantile(0.999)),
                    max: d(h.max()),
                    total: d((h.mean() * h.len() as f64) as u64),
                });
            }
        }
        let per_vcpu = self.inner.per_vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let mut vcpus: Vec<_> = per_vcpu
            .iter()
            .map(|(&vcpu, a)| VcpuBlocked {
                vcpu,
                faults: a.faults,
                blocked: d(a.blocked_ns),
                p99: d(if a.hist.is_empty() { 0 } else { a.hist.value_at_quantile(0.99) }),
            })
            .collect();
        vcpus.sort_by_key(|v| v.vcpu);
        out.vcpus = vcpus;
        out.unattributed_faults = self.inner.unattributed_faults.load(Ordering::Relaxed);
        out.unattributed_blocked = d(self.inner.unattributed_ns.load(Ordering::Relaxed));
        let faults = out.span(FAULT).map_or(0, |s| s.count);
        out.tail = self.tail(faults);
        out
    }

    /// The breakdown of the slowest 0.1% of `faults` faults.
    fn tail(&self, faults: u64) -> Option<TailBreakdown> {
        let mut kept: Vec<_> = self.inner.tail.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|r| r.0).collect();
        if kept.is_empty() {
            return None;
        }
        kept.sort_unstable_by_key(|f| Reverse(f.0));
        let n = usize::try_from(faults.div_ceil(1000)).unwrap_or(usize::MAX).clamp(1, kept.len());
        let tail = &kept[..n];
        let total: u64 = tail.iter().map(|t| t.0).sum();
        let mut causes: Vec<(&'static str, Duration)> = CAUSES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let ns: u64 = tail.iter().map(|t| t.1[i].min(t.0)).sum();
                (name.trim_end_matches("_ns"), Duration::from_nanos(ns))
            })
            .collect();
        let known: u64 = tail.iter().map(|t| t.1.iter().sum::<u64>().min(t.0)).sum();
        causes.push(("other", Duration::from_nanos(total - known)));
        Some(TailBreakdown {
            faults: n as u64,
            from: Duration::from_nanos(tail[n - 1].0),
            total: Duration::from_nanos(total),
            causes,
        })
    }

    /// Keeps a closed fault's duration and causes if it is among the
    /// slowest [`TAIL_KEEP`].
    fn keep_tail(&self, ns: u64, causes: [u64; CAUSES.len()]) {
        if ns <= self.inner.tail_floor.load(Ordering::Relaxed) {
            return;
        }
        let mut heap = self.inner.tail.lock().unwrap_or_else(|e| e.into_inner());
        heap.push(Reverse((ns, causes)));
        if heap.len() > TAIL_KEEP {
            heap.pop();
            if let Some(Reverse((floor, _))) = heap.peek() {
                self.inner.tail_floor.store(*floor, Ordering::Relaxed);
            }
        }
    }

    /// The latency distribution of each span name that occurred: (quantile,
    /// latency) points from the median to the maximum, for plotting.
    pub fn curves(&self) -> Vec<(&'static str, Vec<(f64, Duration)>)> {
        SPANS
            .iter()
            .zip(&self.inner.spans)
            .filter_map(|(&name, h)| {
                let h = h.lock().unwrap_or_else(|e| e.into_inner());
                if h.is_empty() {
                    return None;
                }
                let mut points: Vec<(f64, Duration)> = h
                    .iter_quantiles(2)
                    .map(|v| (v.quantile_iterated_to(), Duration::from_nanos(v.value_iterated_to())))
                    .collect();
                points.dedup_by(|a, b| a.0 == b.0);
                Some((name, points))
            })
            .collect()
    }

    /// Writes the buffered spans as a Chrome trace (JSON that Perfetto and
    /// `chrome://tracing` open): one complete event per span, on the lane
    /// of the faulting thread for faults and of the opening thread
    /// otherwise. Only the most recent spans are kept (see
    /// [`Self::with_trace`]); `otherData.dropped_events` says how many
    /// older ones were dropped. A layer without a trace writes no events.
    pub fn write_chrome_trace(&self, mut w: impl Write) -> io::Result<TraceWritten> {
        let empty = TraceBuf { events: VecDeque::new(), capacity: 0, dropped: 0, thread_names: HashMap::new() };
        let guard = self.inner.trace.as_ref().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()));
        let buf = guard.as_deref().unwrap_or(&empty);
        write!(w, "{{\"displayTimeUnit\":\"ns\",\"traceEvents\":[")?;
        let mut first = true;
        let mut sep = |w: &mut dyn Write| -> io::Result<()> {
            if !std::mem::take(&mut first) {
                w.write_all(b",\n")?;
            }
            Ok(())
        };
        let mut names: Vec<_> = buf.thread_names.iter().collect();
        names.sort();
        for (tid, name) in names {
            sep(&mut w)?;
            write!(
                w,
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{tid},\"args\":{{\"name\":{}}}}}",
                json_string(name)
            )?;
        }
        for e in &buf.events {
            sep(&mut w)?;
            write!(
                w,
                "{{\"name\":\"{}\",\"cat\":\"apf\",\"ph\":\"X\",\"pid\":1,\"tid\":{},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{",
                e.name,
                e.lane,
                e.start_ns as f64 / 1e3,
                e.dur_ns as f64 / 1e3
            )?;
            let mut args = Vec::new();
            if let Some(o) = &e.outcome {
                args.push(format!("\"outcome\":{}", json_string(o)));
            }
            if let Some(g) = e.gpa {
                args.push(format!("\"gpa\":\"{g:#x}\""));
            }
            write!(w, "{}}}}}", args.join(","))?;
        }
        write!(
            w,
            "],\"otherData\":{{\"dropped_events\":{},\"note\":\"the most recent {} spans are kept\"}}}}",
            buf.dropped, buf.capacity
        )?;
        Ok(TraceWritten { events: buf.events.len(), dropped: buf.dropped })
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl<S> Layer<S> for LatencyLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != "apf" {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let keep_details = self.inner.trace.is_some();
        let mut fields = Fields { keep_details, ..Fields::default() };
        attrs.record(&mut fields);
        let thread = if keep_details {
            let tid = thread_id();
            if let Some(trace) = &self.inner.trace {
                let mut t = trace.lock().unwrap_or_else(|e| e.into_inner());
                t.thread_names
                    .entry(tid)
                    .or_insert_with(|| std::thread::current().name().unwrap_or("thread").to_string());
            }
            tid
        } else {
            0
        };
        span.extensions_mut().insert(Timing {
            start: Instant::now(),
            fault_tid: fields.tid,
            thread,
            outcome: fields.outcome,
            gpa: fields.gpa,
            causes: [0; CAUSES.len()],
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        // Fields recorded later matter only for the trace (`outcome`) or
        // if a span names its thread late (`tid`): look the span up only
        // then. The engine records three fields per fault.
        let mut fields = Fields { keep_details: self.inner.trace.is_some(), ..Fields::default() };
        values.record(&mut fields);
        if fields.tid.is_none() && fields.outcome.is_none() && fields.causes.iter().all(Option::is_none) {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        if span.metadata().target() != "apf" {
            return;
        }
        let mut ext = span.extensions_mut();
        if let Some(t) = ext.get_mut::<Timing>() {
            if fields.tid.is_some() {
                t.fault_tid = fields.tid;
            }
            if fields.outcome.is_some() {
                t.outcome = fields.outcome;
            }
            for (slot, value) in t.causes.iter_mut().zip(fields.causes) {
                if let Some(v) = value {
                    *slot = v;
                }
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let name = span.metadata().name();
        let Some(timing) = span.extensions_mut().remove::<Timing>() else { return };
        let elapsed = timing.start.elapsed();
        let ns = nanos(elapsed).clamp(1, MAX_NS);
        // Spans of target `apf` outside the documented list are not kept.
        let Some(slot) = SPANS.iter().position(|n| *n == name) else { return };
        let _ = self.inner.spans[slot].lock().unwrap_or_else(|e| e.into_inner()).record(ns);
        if name == FAULT {
            self.keep_tail(ns, timing.causes);
            let vcpu = timing
                .fault_tid
                .and_then(|t| self.inner.vcpus.read().unwrap_or_else(|e| e.into_inner()).get(&t).copied());
            match vcpu {
                Some(v) => {
                    let mut per = self.inner.per_vcpu.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(acc) = per.get_mut(&v) {
                        acc.faults += 1;
                        acc.blocked_ns += ns;
                        let _ = acc.hist.record(ns);
                    }
                }
                None => {
                    self.inner.unattributed_faults.fetch_add(1, Ordering::Relaxed);
                    self.inner.unattributed_ns.fetch_add(ns, Ordering::Relaxed);
                }
            }
        }
        if let Some(trace) = &self.inner.trace {
            let event = TraceEvent {
                name,
                start_ns: nanos(timing.start.saturating_duration_since(self.inner.epoch)),
                dur_ns: ns,
                lane: if name == FAULT { timing.fault_tid.unwrap_or(timing.thread) } else { timing.thread },
                outcome: timing.outcome,
                gpa: timing.gpa,
            };
            let mut t = trace.lock().unwrap_or_else(|e| e.into_inner());
            if t.events.len() >= t.capacity {
                t.events.pop_front();
                t.dropped += 1;
            }
            t.events.push_back(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn spans_of_other_targets_are_ignored_and_fault_spans_attributed() {
        let layer = LatencyLayer::with_trace(2);
        let subscriber = tracing_subscriber::registry().with(layer.clone());
        layer.register_vcpu(41, 0);
        tracing::subscriber::with_default(subscriber, || {
            let _ = tracing::info_span!(target: "other", "apf.fault", tid = 41u64).entered();
            for tid in [41u64, 41, 99] {
                let s = tracing::info_span!(target: "apf", "apf.fault", tid, outcome = tracing::field::Empty);
                s.record("outcome", "installed");
            }
            let _ = tracing::trace_span!(target: "apf", "apf.fill").entered();
        });
        let s = layer.summary();
        assert_eq!(s.span(FAULT).map(|f| f.count), Some(3));
        assert_eq!(s.span("apf.fill").map(|f| f.count), Some(1));
        assert_eq!(s.vcpus.len(), 1);
        assert_eq!(s.vcpus[0].faults, 2);
        assert_eq!(s.unattributed_faults, 1);
        let mut out = Vec::new();
        let written = layer.write_chrome_trace(&mut out).unwrap();
        assert_eq!(written, TraceWritten { events: 2, dropped: 2 });
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"dropped_events\":2"), "{text}");
        assert!(text.contains("\"name\":\"vcpu0\""), "{text}");
    }

    #[test]
    fn the_slowest_faults_are_broken_down_by_the_causes_they_recorded() {
        let layer = LatencyLayer::new();
        let subscriber = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let fault = || {
                tracing::info_span!(target: "apf", "apf.fault", tid = 1u64, deferred_ns = tracing::field::Empty, install_ns = tracing::field::Empty)
            };
            // 1,999 quick faults and one slow one: the tail is the slowest
            // two (0.1% of 2,000), the slow one and the slowest quick one.
            for _ in 0..1999 {
                drop(fault());
            }
            let slow = fault();
            slow.record("deferred_ns", 3_000_000u64);
            slow.record("install_ns", 1_000_000u64);
            std::thread::sleep(Duration::from_millis(5));
            drop(slow);
        });
        let tail = layer.summary().tail.expect("faults were seen");
        assert_eq!(tail.faults, 2);
        assert!(tail.total >= Duration::from_millis(5));
        assert_eq!(tail.cause("deferred"), Some(Duration::from_millis(3)));
        assert_eq!(tail.cause("install"), Some(Duration::from_millis(1)));
        assert_eq!(tail.cause("queued"), Some(Duration::ZERO));
        let sum: Duration = tail.causes.iter().map(|c| c.1).sum();
        assert_eq!(sum, tail.total, "the causes add up to the tail's time");
        assert!(tail.cause("other").unwrap() >= Duration::from_millis(1));
    }
}
