//! One vCPU's stripe of data pages and their entries in the generation
//! table: what each page must hold, checking it, and stamping it anew.

use core::ops::Range;

use agent_proto::{check_page, page_key, stamp_page, stamp_word, Layout, PAGE_SIZE, PAGE_WORDS};

use crate::machine::{rdtsc_ordered, SharedRam};

/// A page that did not hold its stamp.
#[derive(Debug, Clone, Copy)]
pub struct Corruption {
    /// The generation it should have been at.
    pub generation: u32,
    /// The page.
    pub gpa: u64,
    /// The first wrong word.
    pub word: u64,
    /// What that word should be.
    pub expected: u64,
    /// What it was.
    pub found: u64,
}

/// The stripe of one vCPU. Pages are numbered from 0 at its start.
#[derive(Debug)]
pub struct Stripe {
    ram: SharedRam,
    layout: Layout,
    seed: u64,
    start: u64,
    first_entry: u64,
}

impl Stripe {
    /// The stripe of `vcpu` (below `layout.vcpus`), stamped with `seed`.
    pub fn new(ram: SharedRam, layout: Layout, vcpu: u32, seed: u64) -> Stripe {
        let start = layout.stripe_start(vcpu);
        let first_entry = layout.gen_index(start).expect("a stripe starts at a data page");
        Stripe { ram, layout, seed, start, first_entry }
    }

    /// Pages in the stripe.
    pub fn pages(&self) -> u64 {
        self.layout.stripe_pages
    }

    /// The address of `page`.
    pub fn gpa(&self, page: u64) -> u64 {
        debug_assert!(page < self.pages());
        self.start + page * PAGE_SIZE
    }

    /// The generation `page` is at.
    pub fn generation(&self, page: u64) -> u32 {
        self.ram.read(self.entry(page))
    }

    fn entry(&self, page: u64) -> u64 {
        debug_assert!(page < self.pages());
        self.layout.gen_entry(self.first_entry + page)
    }

    /// Checks every word of `page` against its stamp. Also returns the
    /// cycles the page's first access took: its first word's read, timed
    /// alone (a fault, if the page is missing, happens there).
    pub fn check(&self, page: u64) -> (Result<(), Corruption>, u64) {
        let gpa = self.gpa(page);
        let generation = self.generation(page);
        let t0 = rdtsc_ordered();
        let _first: u64 = self.ram.read(gpa);
        let cycles = rdtsc_ordered().wrapping_sub(t0);
        (self.check_words(gpa, generation), cycles)
    }

    fn check_words(&self, gpa: u64, generation: u32) -> Result<(), Corruption> {
        let mut words = [0u64; PAGE_WORDS];
        self.ram.read_page(gpa, &mut words);
        match check_page(self.seed, gpa, generation, &words) {
            None => Ok(()),
            Some((word, expected, found)) => Err(Corruption { generation, gpa, word: word as u64, expected, found }),
        }
    }

    /// Stamps `page` at its next generation, whatever it holds now.
    pub fn restamp(&self, page: u64) {
        let gpa = self.gpa(page);
        let generation = match self.generation(page) {
            u32::MAX => 1,
            g => g + 1,
        };
        let mut words = [0u64; PAGE_WORDS];
        stamp_page(self.seed, gpa, generation, &mut words);
        self.ram.write_page(gpa, &words);
        // After the page: a table entry never runs ahead of its page.
        self.ram.write(self.entry(page), generation);
    }

    /// Writes the first word of `page` with what it already should hold:
    /// the write faults the page in and leaves its stamp intact. Returns
    /// the cycles the write took.
    pub fn touch(&self, page: u64) -> u64 {
        let gpa = self.gpa(page);
        let generation = self.generation(page);
        let word = stamp_word(page_key(self.seed, gpa, generation), gpa, generation, 0);
        let t0 = rdtsc_ordered();
        self.ram.write(gpa, word);
        rdtsc_ordered().wrapping_sub(t0)
    }

    /// Checks that every word of `page` is zero (what a discarded page
    /// must read as, whatever its generation); returns the first word that
    /// is not, and its value.
    pub fn check_zero(&self, page: u64) -> Result<(), (u64, u64)> {
        let mut words = [0u64; PAGE_WORDS];
        self.ram.read_page(self.gpa(page), &mut words);
        match words.iter().position(|&w| w != 0) {
            None => Ok(()),
            Some(i) => Err((i as u64, words[i])),
        }
    }

    /// Records that `pages` were unplugged: they read as zeros, which is
    /// generation 0.
    pub fn forget(&self, pages: Range<u64>) {
        for page in pages {
            self.ram.write(self.entry(page), 0u32);
        }
    }
}
