use std::error::Error;
use std::fmt;
use std::time::Duration;

/// An attempt took longer than the policy's per-attempt timeout.
///
/// The retry layer classifies it like any other error, so it is retried when the policy
/// allows. The caller sees it only when the last attempt timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptTimeout {
    pub(crate) timeout: Duration,
}

impl AttemptTimeout {
    /// Returns the per-attempt timeout that elapsed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for AttemptTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt timed out after {:?}", self.timeout)
    }
}

impl Error for AttemptTimeout {}

/// The overall deadline of a logical request passed while an attempt was in flight.
///
/// That attempt is cancelled. A deadline that passes between attempts returns the last
/// attempt's outcome instead, because that outcome is a real response from the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    pub(crate) deadline: Duration,
}

impl DeadlineExceeded {
    /// Returns the overall deadline that passed, measured from the first attempt.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request deadline of {:?} exceeded", self.deadline)
    }
}

impl Error for DeadlineExceeded {}

/// A retry policy was built with an invalid value.
///
/// The message names the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPolicy {
    pub(crate) message: String,
}

impl fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid retry policy: {}", self.message)
    }
}

impl Error for InvalidPolicy {}
