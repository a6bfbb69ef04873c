//! Retry metrics through the `metrics` facade.

pub mod names;
mod observer;

pub(crate) use self::observer::AttemptObserver;
