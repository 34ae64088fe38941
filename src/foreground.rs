//! The order both tracks run in when one process applies a whole release
//! in the foreground (`rollout up`, a fleet's `up`): the required track,
//! then the deferred track, going back and forth while a required
//! migration waits for a deferred one (`requires_deferred`). Each caller
//! says how it runs a track (on one connection, or through a
//! [`DeferredHandle`](crate::DeferredHandle) that shows progress); the
//! order is decided here, once.

use crate::error::{Error, ErrorKind};
use crate::report::Report;

/// How a caller runs each track once, for [`run_foreground`].
pub trait Foreground {
    /// What running the deferred track fails with (a CLI's own failure,
    /// say); a required track's [`Error`] converts into it.
    type Error: From<Error>;

    /// Runs the required track once: [`Migrator::run_required`] or one of
    /// its variants.
    ///
    /// [`Migrator::run_required`]: crate::Migrator::run_required
    fn required(&mut self) -> Result<Report, Error>;

    /// Runs the deferred track once, to its end, and returns how many
    /// migrations it applied. `required_blocked`: a required migration
    /// waits for a deferred one, so the deferred track may have nothing it
    /// can do yet.
    fn deferred(&mut self, required_blocked: bool) -> Result<usize, Self::Error>;
}

/// Applies a release in the foreground: the required track; the deferred
/// track when it has work (not at all otherwise); and, when a required
/// migration waits for a deferred one, the deferred track and then the
/// required track again, for as long as either gets further. A required
/// migration still blocked after a deferred run that applied nothing, at
/// the same migration as before, fails with its
/// [`ErrorKind::DeferredDependency`] error (the deferred migration it
/// waits for failed, or waits itself for a later required one).
///
/// # Errors
/// The first error of either track.
pub fn run_foreground<F: Foreground>(f: &mut F) -> Result<(), F::Error> {
    let mut last_blocked: Option<Option<String>> = None;
    loop {
        match f.required() {
            Ok(report) => {
                if report.deferred_pending > 0 {
                    f.deferred(false)?;
                }
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::DeferredDependency => {
                let at = e.migration().map(|m| m.version.clone());
                let applied = f.deferred(true)?;
                if applied == 0 && last_blocked.as_ref() == Some(&at) {
                    return Err(e.into());
                }
                tracing::info!(
                    applied,
                    "the deferred track ran for the required migration waiting on it: going on \
                     with the required track"
                );
                last_blocked = Some(at);
            }
            Err(e) => return Err(e.into()),
        }
    }
}
