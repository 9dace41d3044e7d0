//! What a vCPU does with its stripe: passes that check each page they visit
//! and stamp it anew, a full verify after each, then the offline, balloon
//! and checksum exercises the configuration asks for, and a progress report
//! whose answer says whether to go on.

use core::ops::Range;

use agent_proto::timing::{phase, Histogram, BUCKETS, HIST_CHUNK};
use agent_proto::{
    pass, Config, Counters, Layout, OfflineOp, Reply, Request, Workload, PAGE_SIZE, RING_SLOTS_PER_VCPU,
};
use agent_proto::{
    permute, scattered_index, scattered_pages, FLAG_BALLOON, FLAG_BALLOON_HUGE, FLAG_CHECKSUM, FLAG_GUEST_OFFLINE,
    FLAG_RANDOM_ORDER, FLAG_RESTORE, FLAG_SCATTERED_CHANGED,
};

use crate::checksum::Slots;
use crate::machine::{rdtsc_ordered, SharedRam};
use crate::mailbox::Mailbox;
use crate::rng::Rng;
use crate::stripe::Stripe;

/// Most pages one offline request covers.
const MAX_OFFLINE_PAGES: u64 = 32;
/// Most pages one balloon discard covers.
const MAX_BALLOON_PAGES: u64 = 32;

/// A huge page of guest RAM made of them ([`FLAG_BALLOON_HUGE`]).
const HUGE_PAGE: u64 = 2 << 20;

/// The kinds of pass.
#[derive(Debug, Clone, Copy)]
enum Pass {
    Sequential,
    Random,
    Strided,
}

impl Pass {
    /// The pass after `done` passes of `workload` (not `Touch`).
    fn of(workload: Workload, done: u64) -> Pass {
        match workload {
            Workload::Mixed => [Pass::Sequential, Pass::Random, Pass::Strided][(done % 3) as usize],
            Workload::Sequential | Workload::Touch | Workload::Scattered => Pass::Sequential,
            Workload::Random => Pass::Random,
            Workload::Strided => Pass::Strided,
        }
    }

    /// How a progress report names it.
    fn kind(self) -> u32 {
        match self {
            Pass::Sequential => pass::SEQUENTIAL,
            Pass::Random => pass::RANDOM,
            Pass::Strided => pass::STRIDED,
        }
    }
}

/// One vCPU's agent.
#[derive(Debug)]
pub struct Agent<'m> {
    mailbox: &'m mut Mailbox,
    vcpu: u32,
    config: Config,
    stripe: Stripe,
    slots: Slots,
    rng: Rng,
    stride: u64,
    offline_turn: usize,
    counters: Counters,
    /// The phase being timed ([`phase`]) and when it started.
    phase: u32,
    phase_start: u64,
    /// Cycles of each first access of a page in this phase: a touch, or
    /// a check's first read.
    timed: Histogram,
}

impl<'m> Agent<'m> {
    /// The agent of `vcpu` (below `layout.vcpus`).
    pub fn new(mailbox: &'m mut Mailbox, ram: SharedRam, layout: Layout, vcpu: u32, config: Config) -> Agent<'m> {
        let stripe = Stripe::new(ram, layout, vcpu, config.seed);
        Agent {
            mailbox,
            vcpu,
            config,
            stride: stride_for(stripe.pages()),
            stripe,
            slots: Slots::new(ram, layout, vcpu),
            rng: Rng::new(config.seed ^ u64::from(vcpu)),
            offline_turn: 0,
            counters: Counters::default(),
            phase: phase::TOUCH,
            phase_start: rdtsc_ordered(),
            timed: Histogram::new(),
        }
    }

    /// Runs the workload until the VMM says stop; returns the counters.
    pub fn run(mut self) -> Counters {
        let pages = self.stripe.pages();
        // The first pass's order: the first-touch and restore rates are
        // measured in order and at random.
        let random = self.config.flags & FLAG_RANDOM_ORDER != 0;
        let key = self.config.seed ^ u64::from(self.vcpu).rotate_left(32);
        let order = move |i: u64| if random { permute(i, pages, key) } else { i };
        if self.config.flags & FLAG_RESTORE != 0 && self.config.workload == Workload::Scattered {
            // The same scattered pages at every restore of this snapshot
            // (the key is the seed's and the vCPU's), each verified.
            let visits = scattered_pages(pages);
            let changed = self.config.flags & FLAG_SCATTERED_CHANGED != 0;
            for i in 0..visits {
                self.check(permute(scattered_index(i, visits, pages, changed), pages, key));
            }
            self.progress(pass::RESTORE_VERIFY, visits);
            self.end_phase();
            return self.counters;
        }
        if self.config.flags & FLAG_RESTORE != 0 {
            for i in 0..pages {
                self.check(order(i));
            }
            // Timings after the progress report, which the VMM's
            // throughput figure ends at.
            let stop = self.progress(pass::RESTORE_VERIFY, pages);
            self.end_phase();
            if stop {
                return self.finish();
            }
        }
        if matches!(self.config.workload, Workload::Touch | Workload::Scattered) {
            for i in 0..pages {
                let cycles = self.stripe.touch(order(i));
                self.timed.record(cycles);
            }
            self.counters.pages_written += pages;
            self.counters.passes += 1;
            self.progress(pass::TOUCH, pages);
            self.end_phase();
            return self.counters;
        }
        loop {
            let kind = Pass::of(self.config.workload, self.counters.passes);
            let visited = self.pass(kind);
            self.counters.passes += 1;
            if self.phase == phase::TOUCH {
                // The first pass met fresh pages: the rest re-touch them.
                self.end_phase();
            }
            self.verify();
            if self.config.flags & FLAG_GUEST_OFFLINE != 0 {
                self.offline();
            }
            if self.config.flags & FLAG_BALLOON != 0 {
                self.balloon();
            }
            if self.config.flags & FLAG_CHECKSUM != 0 {
                let good = self.slots.run(&mut self.rng);
                self.counters.checksums += good;
                self.counters.checksum_errors += u64::from(RING_SLOTS_PER_VCPU) - good;
            }
            if self.progress(kind.kind(), visited) {
                return self.finish();
            }
        }
    }

    /// One pass; returns the pages it visited.
    fn pass(&mut self, kind: Pass) -> u64 {
        let pages = self.stripe.pages();
        match kind {
            Pass::Sequential => {
                for page in 0..pages {
                    self.rewrite(page);
                }
                pages
            }
            Pass::Random => {
                let visits = pages / 4;
                for _ in 0..visits {
                    let page = self.rng.below(pages);
                    self.rewrite(page);
                }
                visits
            }
            Pass::Strided => {
                let visits = pages / 2;
                let mut page = self.rng.below(pages);
                for _ in 0..visits {
                    self.rewrite(page);
                    page = (page + self.stride) % pages;
                }
                visits
            }
        }
    }

    /// Checks `page`, then stamps it at its next generation (`check` has
    /// done that already for a page it found corrupt).
    fn rewrite(&mut self, page: u64) {
        if self.check(page) {
            self.stripe.restamp(page);
            self.counters.pages_written += 1;
        }
    }

    /// Checks every page of the stripe, writing only pages found corrupt.
    fn verify(&mut self) {
        for page in 0..self.stripe.pages() {
            self.check(page);
        }
    }

    /// Checks `page`. A corrupt page is reported, counted and stamped
    /// anew, so that it is reported once; returns false for it.
    fn check(&mut self, page: u64) -> bool {
        let (checked, cycles) = self.stripe.check(page);
        self.timed.record(cycles);
        match checked {
            Ok(()) => {
                self.counters.pages_verified += 1;
                true
            }
            Err(c) => {
                let vcpu = self.vcpu;
                let (generation, gpa, word, expected, found) = (c.generation, c.gpa, c.word, c.expected, c.found);
                self.mailbox.ack(&Request::Corrupt { vcpu, generation, gpa, word, expected, found });
                self.counters.corrupt_pages += 1;
                self.stripe.restamp(page);
                self.counters.pages_written += 1;
                false
            }
        }
    }

    /// Asks the VMM to migrate, evict or unplug (in turn) a few pages at a
    /// random place in the stripe.
    fn offline(&mut self) {
        let pages = self.stripe.pages();
        let range = if self.config.flags & FLAG_BALLOON_HUGE != 0 {
            // One whole 2 MiB page: the host offlines huge pages whole only.
            let Some(first) = self.whole_huge_page() else { return };
            first..first + HUGE_PAGE / PAGE_SIZE
        } else {
            let len = 1 + self.rng.below(MAX_OFFLINE_PAGES.min(pages));
            let first = self.rng.below(pages - len + 1);
            first..first + len
        };
        let op = [OfflineOp::Migrate, OfflineOp::Evict, OfflineOp::Unplug][self.offline_turn % 3];
        self.offline_turn += 1;
        let done = self.offline_request(op, &range);
        if op == OfflineOp::Unplug {
            // Even after a failure: part of the range may be gone.
            self.offline_request(OfflineOp::Replug, &range);
            if done {
                self.stripe.forget(range);
            } else {
                // Some pages may have been discarded and some not: what
                // they hold is unknown, so they are written, not checked.
                for page in range {
                    self.stripe.restamp(page);
                    self.counters.pages_written += 1;
                }
            }
        }
    }

    /// Gives a few pages at a random place in the stripe to the VMM's
    /// balloon, checks that every one of them reads as zeros (a page that
    /// still holds its stamp, or anything else, is stale: reported as
    /// corrupt), then writes them again.
    fn balloon(&mut self) {
        let pages = self.stripe.pages();
        let (first, len) = if self.config.flags & FLAG_BALLOON_HUGE != 0 {
            // One whole 2 MiB page of the stripe: the host discards huge
            // pages whole only.
            let Some(first) = self.whole_huge_page() else { return };
            (first, HUGE_PAGE / PAGE_SIZE)
        } else {
            let len = 1 + self.rng.below(MAX_BALLOON_PAGES.min(pages));
            (self.rng.below(pages - len + 1), len)
        };
        let gpa = self.stripe.gpa(first);
        let discarded = match self.mailbox.call(&Request::Balloon { gpa, len: len * PAGE_SIZE }) {
            Reply::Ack { .. } => true,
            // Refused or failed: what the pages hold is unknown (a
            // discard may have gone part of the way), so they are written,
            // not checked.
            Reply::Error { .. } => false,
            Reply::Config(_) => self.mailbox.unexpected(),
        };
        if discarded {
            self.counters.balloon_discards += 1;
        }
        for page in first..first + len {
            if discarded {
                match self.stripe.check_zero(page) {
                    Ok(()) => self.counters.balloon_pages_zero += 1,
                    Err((word, found)) => {
                        let (vcpu, generation, gpa) = (self.vcpu, self.stripe.generation(page), self.stripe.gpa(page));
                        let corrupt = Request::Corrupt { vcpu, generation, gpa, word, expected: 0, found };
                        self.mailbox.ack(&corrupt);
                        self.counters.balloon_stale += 1;
                        self.counters.corrupt_pages += 1;
                    }
                }
            }
            self.stripe.restamp(page);
            self.counters.pages_written += 1;
        }
    }

    /// The first stripe page of a random 2 MiB page that lies wholly in
    /// the stripe, if one does.
    fn whole_huge_page(&mut self) -> Option<u64> {
        let per_huge = HUGE_PAGE / PAGE_SIZE;
        let skip = (self.stripe.gpa(0).next_multiple_of(HUGE_PAGE) - self.stripe.gpa(0)) / PAGE_SIZE;
        let whole = self.stripe.pages().saturating_sub(skip) / per_huge;
        (whole > 0).then(|| skip + self.rng.below(whole) * per_huge)
    }

    /// Sends one offline request; returns whether the VMM carried it out.
    fn offline_request(&mut self, op: OfflineOp, pages: &Range<u64>) -> bool {
        let gpa = self.stripe.gpa(pages.start);
        let len = (pages.end - pages.start) * PAGE_SIZE;
        match self.mailbox.call(&Request::Offline { op, gpa, len }) {
            Reply::Ack { .. } => {
                self.counters.offline_requests += 1;
                true
            }
            Reply::Error { .. } => {
                self.counters.offline_failed += 1;
                false
            }
            Reply::Config(_) => self.mailbox.unexpected(),
        }
    }

    /// Reports a pass; returns whether the VMM says stop.
    fn progress(&mut self, kind: u32, pages: u64) -> bool {
        let (vcpu, passes) = (self.vcpu, self.counters.passes);
        self.mailbox.ack(&Request::Progress { vcpu, kind, passes, pages })
    }

    /// The last verify, after the VMM said stop.
    fn finish(mut self) -> Counters {
        self.verify();
        self.end_phase();
        self.counters
    }

    /// Sends the phase's timings (the non-empty pieces of its histogram,
    /// then its close) and starts the stress phase.
    fn end_phase(&mut self) {
        let (vcpu, phase) = (self.vcpu, self.phase);
        for first in (0..BUCKETS).step_by(HIST_CHUNK) {
            let mut counts = [0u32; HIST_CHUNK];
            for (c, &v) in counts.iter_mut().zip(&self.timed.counts()[first..]) {
                *c = v;
            }
            if counts.iter().any(|&c| c > 0) {
                self.mailbox.ack(&Request::Histogram { vcpu, phase, first: first as u32, counts });
            }
        }
        let (touches, max_cycles) = (self.timed.count(), self.timed.max());
        let tsc_start = self.phase_start;
        let tsc_end = rdtsc_ordered();
        self.mailbox.ack(&Request::Timed { vcpu, phase, touches, max_cycles, tsc_start, tsc_end });
        self.timed = Histogram::new();
        self.phase = phase::STRESS;
        self.phase_start = rdtsc_ordered();
    }
}

/// The stride of strided passes: the first odd number from 17 on that
/// shares no factor with `pages`, so a pass of `pages` visits would see
/// every page once.
fn stride_for(pages: u64) -> u64 {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut stride = 17;
    while gcd(stride, pages) != 1 {
        stride += 2;
    }
    stride % pages
}
