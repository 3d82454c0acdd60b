//! What makes claim bindings race-free: one key per claimed volume and one per taken ordinal,
//! each created (or taken over) only in the same transaction that writes the claim's status.
//!
//! ```text
//! <prefix>/claimbindings/volumes/<volume>          {"claim": NAME, "claimUid": UID}
//! <prefix>/claimbindings/ordinals/<group>/<n>      {"claim": NAME, "claimUid": UID}
//! <prefix>/claims/<name>/alive                     on the holder's lease (held claims)
//! ```
//!
//! A volume key exists exactly while a claim is bound to that volume. An ordinal key stays after
//! its claim is released, remembering whose number it was: the same claim coming back gets it
//! again, and another claim may take it over (compared on the key's revision) only while its
//! owner is not live.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use cobalt_api::{Claim, Resource, Volume};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp};
use serde::{Deserialize, Serialize};

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::objects::{as_new, encode, Stored};
use crate::views::{view_ops, Transition};

/// Who holds a binding key, and the key's revision (what a takeover compares).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    pub claim: String,
    pub claim_uid: String,
    #[serde(skip)]
    pub revision: i64,
}

/// One binding transaction, built by the claim binder.
pub struct Bind<'a> {
    /// The claim as read (its create and status revisions guard the write).
    pub claim: &'a Stored<Claim>,
    /// The status to write.
    pub status: cobalt_api::ClaimStatus,
    /// Bind this volume: its binding key must be absent (no claim holds it).
    pub volume: Option<String>,
    /// Take this ordinal: (group, n, the revision its key had when read; 0 = absent).
    pub ordinal: Option<(String, u32, i64)>,
    /// A volume to create from the claim's template in the same transaction (the store gives it
    /// its uid and writes that into the status' `volumeUid`).
    pub create: Option<Volume>,
}

impl Store {
    fn bindings_prefix(&self) -> String {
        format!("{}/claimbindings/volumes/", self.keys.prefix())
    }
    fn binding_key(&self, volume: &str) -> String {
        format!("{}{volume}", self.bindings_prefix())
    }
    fn ordinals_prefix(&self, group: &str) -> String {
        format!("{}/claimbindings/ordinals/{group}/", self.keys.prefix())
    }

    async fn read_refs(&self, prefix: String) -> Result<BTreeMap<String, ClaimRef>> {
        let resp = self
            .call(
                self.client
                    .kv_client()
                    .get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let mut r: ClaimRef = serde_json::from_slice(kv.value())
                .map_err(|e| Error::Invalid(format!("corrupt claim binding at {key}: {e}")))?;
            r.revision = kv.mod_revision();
            out.insert(rest.to_string(), r);
        }
        Ok(out)
    }

    /// Every claimed volume and the claim holding it.
    pub async fn claim_bindings(&self) -> Result<BTreeMap<String, ClaimRef>> {
        self.read_refs(self.bindings_prefix()).await
    }

    /// A group's ordinal keys: number → the claim that holds (or last held) it.
    pub async fn claim_ordinals(&self, group: &str) -> Result<BTreeMap<u32, ClaimRef>> {
        Ok(self
            .read_refs(self.ordinals_prefix(group))
            .await?
            .into_iter()
            .filter_map(|(n, r)| Some((n.parse().ok()?, r)))
            .collect())
    }

    /// Writes a binding (see [`Bind`]). `Ok(false)` when something moved since it was read —
    /// the claim, the volume's key, the ordinal's key, or a volume of the template's name now
    /// exists — and nothing was written.
    pub async fn bind_claim(&self, b: Bind<'_>) -> Result<bool> {
        let name = b.claim.object.name().to_string();
        let me = ClaimRef {
            claim: name.clone(),
            claim_uid: b.claim.object.metadata.uid.clone(),
            revision: 0,
        };
        let value = serde_json::to_vec(&me).map_err(|e| Error::Invalid(e.to_string()))?;
        let status_key = self.keys.status(Claim::PLURAL, &name);
        let mut guards = vec![
            Compare::create_revision(
                self.keys.object(Claim::PLURAL, &name),
                CompareOp::Equal,
                b.claim.object_create_revision,
            ),
            Compare::mod_revision(
                status_key.clone(),
                CompareOp::Equal,
                b.claim.status_mod_revision,
            ),
        ];
        let mut create = b.create.clone();
        let mut status = b.status.clone();
        if let Some(v) = create.as_mut() {
            as_new(v);
            // The claim names the volume it made by uid, like any other.
            status.volume_uid = Some(v.metadata.uid.clone());
        }
        let status = serde_json::to_vec(&status).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut ops = vec![TxnOp::put(status_key, status, None)];
        if let Some(volume) = &b.volume {
            let key = self.binding_key(volume);
            guards.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(key, value.clone(), None));
        }
        if let Some((group, n, revision)) = &b.ordinal {
            let key = format!("{}{n}", self.ordinals_prefix(group));
            guards.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                *revision,
            ));
            ops.push(TxnOp::put(key, value.clone(), None));
        }
        if let Some(v) = &create {
            let key = self.keys.object(Volume::PLURAL, v.name());
            guards.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            // The volume's own status key too: a leftover would be adopted by the new object.
            guards.push(Compare::create_revision(
                self.keys.status(Volume::PLURAL, v.name()),
                CompareOp::Equal,
                0,
            ));
            ops.push(TxnOp::put(key, encode(v)?, None));
            ops.extend(
                view_ops(
                    &self.keys,
                    Transition {
                        old: None,
                        new: Some(v),
                        object_written: true,
                        status_written: false,
                    },
                )?
                .into_ops(),
            );
        }
        Ok(self.commit(guards, ops).await?.is_some())
    }

    /// Deletes volume `volume`'s binding if it is still `held` (same revision). `Ok(false)` if
    /// it changed meanwhile.
    pub async fn unbind_volume(&self, volume: &str, held: &ClaimRef) -> Result<bool> {
        let key = self.binding_key(volume);
        Ok(self
            .commit(
                vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    held.revision,
                )],
                vec![TxnOp::delete(key, None)],
            )
            .await?
            .is_some())
    }

    /// Renews claim `name`'s hold for `ttl`: keeps its lease alive, or — when there is none, or
    /// it expired — grants a new one and attaches the claim's `alive` key to it.
    pub async fn hold_claim(&self, name: &str, ttl: Duration) -> Result<()> {
        let key = self.keys.alive_of(Claim::PLURAL, name);
        let resp = self
            .call(self.client.kv_client().get(key.clone(), None))
            .await?;
        if let Some(lease) = resp.kvs().first().map(|kv| kv.lease()).filter(|l| *l != 0) {
            let mut client = self.client.lease_client();
            let (mut keeper, mut stream) = self.call(client.keep_alive(lease)).await?;
            self.call(keeper.keep_alive()).await?;
            if let Some(r) = self.call(stream.message()).await? {
                if r.ttl() > 0 {
                    return Ok(());
                }
            }
        }
        let secs = ttl.as_secs().max(1) as i64;
        let lease = self
            .call(self.client.lease_client().grant(secs, None))
            .await?
            .id();
        let options = PutOptions::new().with_lease(lease);
        self.call(
            self.client
                .kv_client()
                .put(key, Utc::now().to_rfc3339(), Some(options)),
        )
        .await?;
        Ok(())
    }

    /// Names of the claims whose holder renews them now.
    pub async fn held_claims(&self) -> Result<BTreeSet<String>> {
        self.alive_names(Claim::PLURAL).await
    }
}
