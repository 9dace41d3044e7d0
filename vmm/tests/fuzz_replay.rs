//! Replays the `mailbox`, `checksum_ring` and `snapshot_header` fuzz
//! targets' checked-in
//! corpora and every crash they found through the same checks the fuzz
//! targets run, on the stable toolchain: what CI runs instead of fuzzing.
//! A missing or empty corpus fails the test (a replay of nothing proves
//! nothing).

#[path = "../../fuzz/checks/checksum_ring.rs"]
mod checksum_ring;
#[path = "../../fuzz/checks/mailbox.rs"]
mod mailbox;
#[path = "../../fuzz/checks/snapshot_header.rs"]
mod snapshot_header;

#[path = "../../fuzz/checks/corpus.rs"]
mod corpus;

/// The corpus of `target` (at least `least` inputs) and its crashes.
fn replay(target: &str, least: usize) -> Vec<Vec<u8>> {
    corpus::replay(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz"), target, least)
}

#[test]
fn mailbox_corpus_and_crashes_replay_clean() {
    let ram = mailbox::guest_ram();
    let mut offline_requests = 0;
    for input in replay("mailbox", 10) {
        let is_offline = input
            .get(5..)
            .is_some_and(|m| matches!(agent_proto::Request::decode(m), Ok((_, agent_proto::Request::Offline { .. }))));
        offline_requests += usize::from(is_offline);
        mailbox::check(&ram, &input);
    }
    // The corpus reaches the VMM's range check, not only the decoder.
    assert!(offline_requests >= 3, "only {offline_requests} inputs are offline requests");
}

#[test]
fn snapshot_header_corpus_and_crashes_replay_clean() {
    let mut decoded = 0;
    for input in replay("snapshot_header", 3) {
        if let Some((len, prefix)) = input.split_first_chunk::<8>() {
            decoded += usize::from(vmm::snapshot::decode_prefix(u64::from_le_bytes(*len), prefix).is_ok());
        }
        snapshot_header::check(&input);
    }
    // The corpus reaches past every refusal to a decoded header and table.
    assert!(decoded >= 1, "no input decodes to a snapshot header");
}

#[test]
fn checksum_ring_corpus_and_crashes_replay_clean() {
    let ring = checksum_ring::Ring::start();
    let mut computed = 0;
    for input in replay("checksum_ring", 5) {
        let len = input.get(1..5).map(|l| u32::from_le_bytes(l.try_into().unwrap()));
        let slot = input.first().map(|&s| u32::from(s) % (agent_proto::RING_SLOTS + 1));
        computed += usize::from(
            slot.is_some_and(|s| s < agent_proto::RING_SLOTS) && len.is_some_and(|l| (1..=4096).contains(&l)),
        );
        checksum_ring::check(&ring, &input);
    }
    // The corpus reaches checksums the device computes, not only refusals.
    assert!(computed >= 2, "only {computed} inputs ask for a checksum");
}
