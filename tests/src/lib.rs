//! Workspace-level integration tests live in `tests/`; this library only compiles the
//! README's code blocks as doctests, so the README cannot drift from the API.

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
