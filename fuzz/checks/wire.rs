//! What must hold for any bytes given to the agent protocol's decoders:
//! [`Request::decode`] (the VMM reads what a guest wrote) and
//! [`Reply::decode`] (the agent reads what the VMM wrote). Shared by the
//! `wire` fuzz target and the replay test of `agent-proto`, so both check
//! the same properties.

use agent_proto::{DecodeError, ErrorCode, Reply, Request, HEADER_LEN, MAX_MESSAGE};

/// Decodes `bytes` as a request and as a reply; panics if a property fails.
pub fn check(bytes: &[u8]) {
    let mut out = [0u8; MAX_MESSAGE];
    match Request::decode(bytes) {
        Ok((seq, req)) => {
            // One encoding per message: a request decodes only from the
            // bytes it encodes to (reserved fields included).
            let n = req.encode(seq, &mut out).expect("a decoded request fits in a message");
            assert_eq!(&out[..n], &bytes[..n], "{req:?} decoded from bytes it does not encode to");
        }
        Err(e) => refused(bytes, e),
    }
    match Reply::decode(bytes) {
        Ok((seq, reply)) => {
            let n = reply.encode(seq, &mut out).expect("a decoded reply fits in a message");
            assert_eq!(&out[..n], &bytes[..n], "{reply:?} decoded from bytes it does not encode to");
        }
        Err(e) => refused(bytes, e),
    }
}

/// A refusal names a decoding problem and the sequence number it got to,
/// and the error reply the VMM answers with survives its own round trip.
fn refused(bytes: &[u8], e: DecodeError) {
    assert!(
        matches!(
            e.code,
            ErrorCode::BadMagic
                | ErrorCode::BadVersion
                | ErrorCode::UnknownKind
                | ErrorCode::BadLength
                | ErrorCode::BadValue
        ),
        "a decoder refused with {:?}, which is not a decoding error",
        e.code
    );
    if bytes.len() >= HEADER_LEN && e.code != ErrorCode::BadMagic {
        let seq = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        assert_eq!(e.seq, seq, "a refusal past the magic carries the message's sequence number");
    }
    let answer = Reply::Error { code: e.code, detail: e.detail };
    let mut out = [0u8; MAX_MESSAGE];
    let n = answer.encode(e.seq, &mut out).expect("an error reply fits in a message");
    assert_eq!(Reply::decode(&out[..n]), Ok((e.seq, answer)));
}
