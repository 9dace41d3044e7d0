//! Talking to the VMM: a request at the start of the vCPU's mailbox page, a
//! 32-bit `out` of the page's frame number, and the reply the VMM has left
//! at `REPLY_OFFSET` of the same page when the `out` returns.

use agent_proto::{Config, Reply, Request, AGENT_PORT, MAILBOX_BASE, MAX_MESSAGE, PAGE_SIZE, REPLY_OFFSET};

use crate::machine::{halt, out32, SharedRam};

/// Codes of [`Request::Fatal`]: why the agent gave up.
pub mod fatal {
    /// A reply did not decode; detail: its `ErrorCode`.
    pub const BAD_REPLY: u32 = 1;
    /// A reply answered another request; detail: its sequence number.
    pub const WRONG_SEQ: u32 = 2;
    /// The VMM refused a request that cannot fail; detail: its `ErrorCode`.
    pub const REFUSED: u32 = 3;
    /// A reply of the wrong kind; detail: the request's sequence number.
    pub const UNEXPECTED: u32 = 4;
    /// The configuration makes no layout; detail: the RAM size or vCPU count.
    pub const LAYOUT: u32 = 5;
    /// The configuration has fewer vCPUs than this one's id; detail: the count.
    pub const NOT_A_VCPU: u32 = 6;
    /// The vCPU started on another vCPU's stack; detail: the stack pointer.
    pub const STACK: u32 = 7;
    /// A panic; detail: the source line.
    pub const PANIC: u32 = 0xdead;
}

/// One vCPU's mailbox.
#[derive(Debug)]
pub struct Mailbox {
    ram: SharedRam,
    vcpu: u32,
    page: u64,
    seq: u32,
}

impl Mailbox {
    /// The mailbox of `vcpu` (below `MAX_VCPUS`), before its first request.
    pub fn new(ram: SharedRam, vcpu: u32) -> Mailbox {
        Mailbox { ram, vcpu, page: MAILBOX_BASE + u64::from(vcpu) * PAGE_SIZE, seq: 0 }
    }

    /// The mailbox of `vcpu` as it was left: the request still in it
    /// tells the sequence number to go on from. For the panic handler,
    /// which has nowhere else to keep it.
    pub fn resume(ram: SharedRam, vcpu: u32) -> Mailbox {
        let mut mailbox = Mailbox::new(ram, vcpu);
        let mut last = [0u8; MAX_MESSAGE];
        mailbox.read_message(0, &mut last);
        mailbox.seq = Request::decode(&last).map_or(0, |(seq, _)| seq);
        mailbox
    }

    /// Sends `request`; returns the reply. A reply that does not decode or
    /// answers another request means the channel is broken: the agent
    /// reports it and halts.
    pub fn call(&mut self, request: &Request) -> Reply {
        match self.exchange(request) {
            Ok(reply) => reply,
            Err((code, detail)) => self.fatal(code, detail),
        }
    }

    /// Sends a request whose only good answer is an ack; returns its
    /// `stop`. Anything else is fatal.
    pub fn ack(&mut self, request: &Request) -> bool {
        match self.call(request) {
            Reply::Ack { stop, .. } => stop,
            Reply::Error { code, .. } => self.fatal(fatal::REFUSED, code as u64),
            Reply::Config(_) => self.unexpected(),
        }
    }

    /// Says hello; returns the configuration.
    pub fn hello(&mut self) -> Config {
        match self.call(&Request::Hello { vcpu: self.vcpu }) {
            Reply::Config(config) => config,
            Reply::Error { code, .. } => self.fatal(fatal::REFUSED, code as u64),
            Reply::Ack { .. } => self.unexpected(),
        }
    }

    /// Gives up on a reply of the wrong kind for the last request.
    pub fn unexpected(&mut self) -> ! {
        self.fatal(fatal::UNEXPECTED, u64::from(self.seq))
    }

    /// Tells the VMM why the agent gives up (if the mailbox still works),
    /// and halts.
    pub fn fatal(&mut self, code: u32, detail: u64) -> ! {
        let _ = self.exchange(&Request::Fatal { vcpu: self.vcpu, code, detail });
        halt()
    }

    fn exchange(&mut self, request: &Request) -> Result<Reply, (u32, u64)> {
        self.seq = self.seq.wrapping_add(1);
        let mut message = [0u8; MAX_MESSAGE];
        let len = request.encode(self.seq, &mut message).expect("every request fits in MAX_MESSAGE");
        for (i, word) in message[..len.next_multiple_of(8)].chunks_exact(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            self.ram.write(self.page + i as u64 * 8, u64::from_le_bytes(bytes));
        }
        out32(AGENT_PORT, (self.page / PAGE_SIZE) as u32);
        self.read_message(REPLY_OFFSET as u64, &mut message);
        let (seq, reply) = Reply::decode(&message).map_err(|e| (fatal::BAD_REPLY, e.code as u64))?;
        if seq != self.seq {
            return Err((fatal::WRONG_SEQ, u64::from(seq)));
        }
        Ok(reply)
    }

    fn read_message(&self, offset: u64, message: &mut [u8; MAX_MESSAGE]) {
        for (i, word) in message.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&self.ram.read::<u64>(self.page + offset + i as u64 * 8).to_le_bytes());
        }
    }
}
