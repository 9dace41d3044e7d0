//! A minimal KVM VMM that backs guest RAM with the apf engine and runs the
//! guest agent.
//!
//! Not written yet: the engine it embeds ([`apf`]) comes first. The crate
//! exists so the workspace has its final shape.

pub use apf;
