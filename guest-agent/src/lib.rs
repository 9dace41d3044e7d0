//! The guest agent: a `no_std` x86-64 program that stamps, rewrites and
//! verifies its memory while the VMM offlines it underneath.
//!
//! Not written yet: it arrives with the KVM VMM. The crate exists so the
//! workspace has its final shape.
#![no_std]
