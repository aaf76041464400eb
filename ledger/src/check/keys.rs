//! The keys a node's batches may be signed with: enrolled ones, and those the chain announced
//! (verified rotations), by epoch and key id, less the revoked.

use super::*;

/// Why a key the chain announced is not learnt.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("epoch {epoch} is revoked by the enrolment")]
    Revoked { epoch: u32 },
    #[error("epoch {epoch} already has a different key")]
    EpochTaken { epoch: u32 },
    #[error("public key: {0}")]
    PublicKey(ed25519_dalek::SignatureError),
}

/// A key the chain itself announced (a verified `KeyRotation`), as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearntKey {
    pub epoch: u32,
    pub public_key: [u8; 32],
    pub key_id: KeyId,
    /// The first seq signed with it.
    pub effective_seq: u64,
    /// The seq of the batch (signed by the previous key) that announced it.
    pub announced_seq: u64,
}

/// Where a known key came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    Enrolled(PathBuf),
    Rotation { announced_seq: u64 },
}

#[derive(Clone, Debug)]
pub struct KnownKey {
    pub identity: PublicIdentity,
    pub verifying: VerifyingKey,
    pub key_id: KeyId,
    pub origin: KeyOrigin,
}

impl KnownKey {
    /// Whether `signature` is this key's Ed25519 signature (strict) over exactly `bytes`.
    pub fn signed(&self, bytes: &[u8], signature: &[u8]) -> bool {
        Signature::from_slice(signature)
            .is_ok_and(|sig| self.verifying.verify_strict(bytes, &sig).is_ok())
    }
}

/// Every key the ledger trusts for one node: the enrolled ones plus those learnt from rotations.
#[derive(Clone, Debug)]
pub struct KnownKeys {
    node_id: String,
    by_epoch: BTreeMap<u32, KnownKey>,
    /// Epochs the enrolment revokes: never known, never learnt.
    revoked: std::collections::BTreeSet<u32>,
}

impl KnownKeys {
    pub fn new(node_id: &str, enrolled: &BTreeMap<u32, EnrolledKey>) -> Self {
        let mut by_epoch = BTreeMap::new();
        for (&epoch, k) in enrolled {
            // Enrolment already checked the key; a failure here would be a bug, so skip it.
            if let Ok(verifying) = k.identity.verifying_key() {
                by_epoch.insert(
                    epoch,
                    KnownKey {
                        identity: k.identity.clone(),
                        verifying,
                        key_id: k.key_id,
                        origin: KeyOrigin::Enrolled(k.file.clone()),
                    },
                );
            }
        }
        Self {
            node_id: node_id.to_owned(),
            by_epoch,
            revoked: std::collections::BTreeSet::new(),
        }
    }

    /// The same keys without the `revoked` epochs, which are never learnt either: nothing
    /// signed by them is accepted from then on (`revoked`).
    pub fn without(mut self, revoked: &std::collections::BTreeSet<u32>) -> Self {
        for e in revoked {
            self.by_epoch.remove(e);
        }
        self.revoked.clone_from(revoked);
        self
    }

    /// The highest key epoch known (enrolled or learnt).
    pub fn max_epoch(&self) -> Option<u32> {
        self.by_epoch.keys().next_back().copied()
    }

    pub fn is_revoked(&self, epoch: u32) -> bool {
        self.revoked.contains(&epoch)
    }

    /// Adds a key the chain announced. An enrolled or earlier-learnt key for the same epoch wins;
    /// a different one is refused (the verifier reports such a rotation as bad anyway).
    pub fn learn(&mut self, k: &LearntKey) -> Result<(), LearnError> {
        if self.revoked.contains(&k.epoch) {
            return Err(LearnError::Revoked { epoch: k.epoch });
        }
        if let Some(existing) = self.by_epoch.get(&k.epoch) {
            return if existing.key_id == k.key_id {
                Ok(())
            } else {
                Err(LearnError::EpochTaken { epoch: k.epoch })
            };
        }
        let verifying = VerifyingKey::from_bytes(&k.public_key).map_err(LearnError::PublicKey)?;
        self.by_epoch.insert(
            k.epoch,
            KnownKey {
                identity: PublicIdentity {
                    node_id: self.node_id.clone(),
                    key_epoch: k.epoch,
                    algorithm: "ed25519".into(),
                    public_key: hex(&k.public_key),
                    key_id: hex(&k.key_id),
                },
                verifying,
                key_id: k.key_id,
                origin: KeyOrigin::Rotation {
                    announced_seq: k.announced_seq,
                },
            },
        );
        Ok(())
    }

    pub fn epoch(&self, epoch: u32) -> Option<&KnownKey> {
        self.by_epoch.get(&epoch)
    }

    pub fn by_key_id(&self, key_id: &[u8]) -> Option<&KnownKey> {
        self.by_epoch
            .values()
            .find(|k| k.key_id.as_slice() == key_id)
    }

    pub fn has_epoch(&self, epoch: u32) -> bool {
        self.by_epoch.contains_key(&epoch)
    }

    /// A verifier of this node's batches, trusting every known key.
    pub(super) fn verifier(&self) -> Verifier {
        Verifier::with_keys(
            &self.node_id,
            self.by_epoch.iter().map(|(&e, k)| (e, k.verifying)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u32, seed: u8) -> LearntKey {
        let public_key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes();
        LearntKey {
            epoch,
            public_key,
            key_id: key_id_of(&public_key),
            effective_seq: 10,
            announced_seq: 9,
        }
    }

    /// A rotation is learnt once per epoch; the same key again is no news, another key for a
    /// known epoch or a revoked epoch is refused with the epoch named.
    #[test]
    fn a_rotation_is_learnt_once_and_conflicts_are_named() {
        let revoked = std::collections::BTreeSet::from([3]);
        let mut keys = KnownKeys::new("n1", &BTreeMap::new()).without(&revoked);
        keys.learn(&key(2, 7)).unwrap();
        assert!(keys.has_epoch(2));
        keys.learn(&key(2, 7)).unwrap();
        let taken = keys.learn(&key(2, 8)).unwrap_err();
        assert!(matches!(taken, LearnError::EpochTaken { epoch: 2 }));
        assert_eq!(taken.to_string(), "epoch 2 already has a different key");
        let revoked = keys.learn(&key(3, 9)).unwrap_err();
        assert_eq!(revoked.to_string(), "epoch 3 is revoked by the enrolment");
        assert!(!keys.has_epoch(3));
    }
}
