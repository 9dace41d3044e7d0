//! Cross-crate integration tests (real KVM guests) live in `tests/tests/`.
//! The engine's own tests, which need only userfaultfd, are in `apf/tests/`.
