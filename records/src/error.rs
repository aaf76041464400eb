//! The crate's one error type. Each function returns the focused error of its concern (a
//! caller matching on why a header was refused should not see spool variants); every one of
//! them converts into [`Error`] with `?`, for a caller that handles any records failure alike.

use crate::batch::HeaderError;
use crate::durable::AtomicWriteError;
use crate::identity::{IdentityError, PublicKeyError};
use crate::segment::frame::FrameError;
use crate::segment::SpoolError;
use crate::totals::{LostEnergyError, RunsLostError};
use crate::verify::{TrustError, VerifyError};

/// Any failure of the records crate, by concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stored batch's header.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A node's public key.
    #[error(transparent)]
    PublicKey(#[from] PublicKeyError),
    /// The node's key files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The keys a verifier is given to trust.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A chain that does not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A durable write.
    #[error(transparent)]
    AtomicWrite(#[from] AtomicWriteError),
    /// The energy of a lost range.
    #[error(transparent)]
    LostEnergy(#[from] LostEnergyError),
    /// The per-run energy of a lost range.
    #[error(transparent)]
    RunsLost(#[from] RunsLostError),
    /// Reading a spool's segments.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// One frame of a segment.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A result of the records crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each concern's error converts with `?` and keeps its message and its variant.
    #[test]
    fn every_concern_converts_and_keeps_its_message() {
        fn lost() -> Result<()> {
            Err(RunsLostError::NoCheckpoint { seq: 7 })?;
            Ok(())
        }
        let e = lost().unwrap_err();
        assert_eq!(e.to_string(), "batch 7 carries no run checkpoint");
        assert!(matches!(
            e,
            Error::RunsLost(RunsLostError::NoCheckpoint { seq: 7 })
        ));
        let w = Error::from(AtomicWriteError::Sync(std::io::Error::other("EIO")));
        assert_eq!(w.to_string(), "syncing the new file or its directory: EIO");
    }
}
