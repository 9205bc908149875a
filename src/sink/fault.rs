//! Failure injection for the in-memory test doubles of the sinks
//! ([`registry::memory`](crate::sink::registry::memory), [`notify::memory`](crate::sink::notify::memory)).
//!
//! A test arms failures per operation ("the next 2 commits fail transiently"); each call of the
//! operation takes the oldest armed failure, if any. The three kinds are the three outcomes a caller
//! of a real server must be ready for:
//! - [`Fault::Transient`]: the call fails with a transient error and has no effect (the server was
//!   unreachable);
//! - [`Fault::TransientAfter`]: the call takes effect, then fails with a transient error (the reply
//!   was lost: "maybe done"), so a retry meets its own earlier effect;
//! - [`Fault::Definite`]: the call fails with a definite error and has no effect.
//!
//! The doubles also count the calls of each operation, so a test can see that a retry happened.

use std::collections::VecDeque;

use crate::error::{Component, Error};

/// How an injected failure shows (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails transiently, without effect.
    Transient,
    /// Takes effect, then fails transiently.
    TransientAfter,
    /// Fails definitely, without effect.
    Definite,
}

/// Armed failures and call counts of the operations `Op` of one double.
#[derive(Debug)]
pub(crate) struct Faults<Op> {
    armed: VecDeque<(Op, Fault)>,
    calls: Vec<(Op, usize)>,
}

impl<Op> Default for Faults<Op> {
    fn default() -> Self {
        Faults {
            armed: VecDeque::new(),
            calls: Vec::new(),
        }
    }
}

impl<Op: Copy + PartialEq> Faults<Op> {
    /// Makes the next `n` calls of `op` fail with `fault` (after any failures armed before).
    pub(crate) fn arm(&mut self, op: Op, n: usize, fault: Fault) {
        self.armed.extend(std::iter::repeat_n((op, fault), n));
    }

    /// Counts a call of `op` and takes the failure it is to suffer, if one is armed.
    pub(crate) fn enter(&mut self, op: Op) -> Option<Fault> {
        match self.calls.iter_mut().find(|(o, _)| *o == op) {
            Some((_, n)) => *n += 1,
            None => self.calls.push((op, 1)),
        }
        let i = self.armed.iter().position(|(o, _)| *o == op)?;
        self.armed.remove(i).map(|(_, f)| f)
    }

    /// How many times `op` was called (failed calls included).
    pub(crate) fn calls(&self, op: Op) -> usize {
        self.calls
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0, |(_, n)| *n)
    }
}

impl Fault {
    /// The error a call of `what` on `component` reports under this fault.
    pub(crate) fn error(self, component: Component, what: &str) -> Error {
        match self {
            Fault::Transient => Error::transient(component, format!("{what}: injected failure")),
            Fault::TransientAfter => Error::transient(
                component,
                format!("{what}: injected failure after the effect (reply lost)"),
            ),
            Fault::Definite => {
                Error::definite(component, format!("{what}: injected definite failure"))
            }
        }
    }
}
