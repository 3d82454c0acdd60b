//! The claim binder: the leader binds each live Claim to one volume — a free matching one, or
//! the one numbered like the claim within its group — creating it from the claim's template
//! when none is free, and releases claims whose holder went away.
//!
//! Every binding is one fenced transaction ([`cobalt_store::Bind`]): the volume's binding key
//! created (compared absent), the ordinal key taken (compared on its revision), the claim's
//! status and any template volume written together. A transaction that loses a race writes
//! nothing and the claim is simply tried again; a deposed leader's write is refused.
//!
//! The choices themselves are pure functions ([`choose_volume`], [`choose_ordinal`]) tested
//! without I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use cobalt_api::claim::{GROUP_LABEL, ORDINAL_LABEL};
use cobalt_api::{
    find_condition, set_condition, Claim, ClaimPhase, ClaimStatus, ClaimStrategy, ConditionStatus,
    Resource, Volume, VolumePhase,
};
use cobalt_reconcile::{Action, Cache, CancellationToken, Context, Reconciler, RequeueHandle};
use cobalt_store::{Bind, ClaimRef, Store};

use super::binding::{Alive, SchedulerError};

/// How soon a claim that lost a race for a volume or ordinal tries again.
const RETRY_AFTER_RACE: Duration = Duration::from_millis(20);
/// How often held claims and leftover bindings are checked.
pub const HOLD_POLL: Duration = Duration::from_millis(500);

/// Claims whose holder renews them now (refreshed by [`poll_holds`]).
pub type Held = Arc<RwLock<BTreeSet<String>>>;

pub struct ClaimBinder {
    /// The leadership-fenced store.
    pub store: Store,
    pub volumes: Cache<Volume>,
    pub alive: Alive,
    pub held: Held,
    pub events: cobalt_store::Recorder,
}

/// True while the claim may hold a volume: not held at all, or held and renewed.
pub fn is_live(c: &Claim, held: &BTreeSet<String>) -> bool {
    !c.metadata.is_deleting()
        && (c.spec.hold_seconds.is_none() || held.contains(c.metadata.name.as_str()))
}

/// A stable 64-bit hash (FNV-1a, then mixed) of `claim` and `volume`: the rendezvous rank that spreads claims
/// over equally good volumes.
fn rank(claim: &str, volume: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in claim.bytes().chain([0]).chain(volume.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser: names differing in one character land far apart.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The free volume an `any` claim gets: one matching its selector and group that no claim
/// holds and that is not being deleted — its previous volume first (a returning holder gets its
/// data back), then volumes on ready machines, then by the claim's rendezvous rank: the same
/// claim always prefers the same volume, and claims booting together spread over the free
/// volumes instead of all racing for the first.
pub fn choose_volume<'a>(
    claim: &Claim,
    volumes: &'a [Arc<Volume>],
    bound: &BTreeMap<String, ClaimRef>,
    alive: &BTreeSet<String>,
) -> Option<&'a Volume> {
    let previous = claim.status.as_ref().and_then(|s| s.volume_uid.as_deref());
    volumes
        .iter()
        .map(|v| &**v)
        .filter(|v| {
            !v.metadata.is_deleting()
                && claim.matches(&v.metadata.labels)
                && !bound.contains_key(v.metadata.name.as_str())
        })
        .min_by_key(|v| {
            let on_ready = v
                .status
                .as_ref()
                .and_then(|s| s.machine.as_deref())
                .or(v.spec.machine.as_deref())
                .is_some_and(|m| alive.contains(m));
            (
                Some(v.metadata.uid.as_str()) != previous,
                !on_ready,
                rank(&claim.metadata.name, &v.metadata.name),
                v.metadata.name.clone(),
            )
        })
}

/// The ordinal a claim gets in its group: the one it already holds (by name: a claim created
/// again under the same name gets its number back), else the lowest that no live claim holds.
/// Returns the number and the revision its key had (0 = never taken).
pub fn choose_ordinal(
    claim: &str,
    ordinals: &BTreeMap<u32, ClaimRef>,
    live: impl Fn(&ClaimRef) -> bool,
) -> (u32, i64) {
    if let Some((n, r)) = ordinals.iter().find(|(_, r)| r.claim == claim) {
        return (*n, r.revision);
    }
    let mut n = cobalt_api::claim::FIRST_ORDINAL;
    loop {
        match ordinals.get(&n) {
            None => return (n, 0),
            Some(r) if !live(r) => return (n, r.revision),
            Some(_) => n += 1,
        }
    }
}

/// The status of a claim bound to `v`.
fn bound_status(c: &Claim, v: &Volume, ordinal: Option<u32>) -> ClaimStatus {
    let mut s = c.status.clone().unwrap_or_default();
    s.phase = ClaimPhase::Bound;
    s.volume = Some(v.metadata.name.to_string());
    s.volume_uid = Some(v.metadata.uid.clone());
    s.ordinal = ordinal.or(s.ordinal);
    s.observed_generation = c.metadata.generation;
    let vs = v.status.as_ref();
    s.machine = vs.and_then(|s| s.machine.as_deref()).map(str::to_string);
    s.endpoint = vs.and_then(|s| s.endpoint.clone());
    let now = Utc::now();
    let which = match s.ordinal {
        Some(n) => format!("bound to volume {} (ordinal {n})", v.metadata.name),
        None => format!("bound to volume {}", v.metadata.name),
    };
    set_condition(
        &mut s.conditions,
        "Bound",
        ConditionStatus::True,
        "Bound",
        &which,
        c.metadata.generation,
        now,
    );
    let exported = vs.is_some_and(|s| s.claims.iter().any(|n| *n == c.metadata.name));
    let volume_ready = vs.is_some_and(|s| s.phase == VolumePhase::Ready);
    let (ok, reason, message) = match (volume_ready, exported) {
        (true, true) => (
            true,
            "Served".to_string(),
            format!(
                "volume {} is served to {} by machine {}",
                v.metadata.name,
                c.spec.host,
                s.machine.as_deref().unwrap_or("?")
            ),
        ),
        (true, false) => (
            false,
            "NotExported".into(),
            format!(
                "waiting for machine {} to export volume {} to {}",
                s.machine.as_deref().unwrap_or("?"),
                v.metadata.name,
                c.spec.host
            ),
        ),
        (false, _) => {
            let why = vs
                .and_then(|s| find_condition(&s.conditions, "Ready"))
                .map(|r| format!("{}: {}", r.reason, r.message))
                .unwrap_or_else(|| "not provisioned yet".into());
            (
                false,
                "VolumeNotReady".into(),
                format!("volume {} is not ready ({why})", v.metadata.name),
            )
        }
    };
    set_condition(
        &mut s.conditions,
        "Ready",
        if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        &reason,
        &message,
        c.metadata.generation,
        now,
    );
    s
}

/// The status of a claim that is not bound, saying why.
fn unbound_status(
    c: &Claim,
    phase: ClaimPhase,
    ordinal: Option<u32>,
    reason: &str,
    message: &str,
) -> ClaimStatus {
    let mut s = c.status.clone().unwrap_or_default();
    s.phase = phase;
    if phase == ClaimPhase::Pending {
        // A released claim remembers its volume (its holder gets it back); a pending one shows
        // none.
        s.machine = None;
        s.endpoint = None;
    } else {
        s.endpoint = None;
    }
    s.ordinal = ordinal.or(s.ordinal);
    s.observed_generation = c.metadata.generation;
    let now = Utc::now();
    set_condition(
        &mut s.conditions,
        "Bound",
        ConditionStatus::False,
        reason,
        message,
        c.metadata.generation,
        now,
    );
    set_condition(
        &mut s.conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        message,
        c.metadata.generation,
        now,
    );
    s
}

/// A Volume made from the claim's template, named `name`.
fn from_template(c: &Claim, name: &str, ordinal: Option<u32>) -> Option<Volume> {
    let spec = c.spec.create.clone()?;
    let mut v = Volume::new(name, spec);
    v.metadata.labels = c.template_labels(ordinal);
    Some(v)
}

fn selector_text(c: &Claim) -> String {
    let mut parts: Vec<String> = c
        .spec
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if let Some(g) = &c.spec.group {
        parts.push(format!("{GROUP_LABEL}={g}"));
    }
    if parts.is_empty() {
        "(any labels)".into()
    } else {
        parts.join(",")
    }
}

impl ClaimBinder {
    fn held(&self) -> BTreeSet<String> {
        self.held.read().map(|h| h.clone()).unwrap_or_default()
    }

    async fn write_status(
        &self,
        stored: &cobalt_store::Stored<Claim>,
        status: ClaimStatus,
    ) -> Result<bool, SchedulerError> {
        if stored.object.status.as_ref() == Some(&status) {
            return Ok(true);
        }
        Ok(self
            .store
            .bind_claim(Bind {
                claim: stored,
                status,
                volume: None,
                ordinal: None,
                create: None,
            })
            .await?)
    }

    /// A bound claim: keeps its status in step with its volume, grows the volume when the claim
    /// asks for more, and lets go of a volume that was deleted.
    async fn keep_bound(
        &self,
        stored: &cobalt_store::Stored<Claim>,
        volume: &str,
        held: &ClaimRef,
    ) -> Result<Action, SchedulerError> {
        let c = &stored.object;
        let v = self.store.get::<Volume>(volume).await?;
        let same = v.as_ref().filter(|v| {
            !v.metadata.is_deleting()
                && c.status.as_ref().and_then(|s| s.volume_uid.as_deref())
                    == Some(v.metadata.uid.as_str())
        });
        let Some(v) = same else {
            // The volume is gone (or going): free the key; the claim binds anew.
            self.store.unbind_volume(volume, held).await?;
            let s = unbound_status(
                c,
                ClaimPhase::Pending,
                None,
                "VolumeDeleted",
                &format!("volume {volume} was deleted; looking for another"),
            );
            self.write_status(stored, s).await?;
            return Ok(Action::RequeueAfter(RETRY_AFTER_RACE));
        };
        if let Some(want) = c.spec.create.as_ref().map(|t| t.size) {
            if want.bytes() > v.spec.size.bytes() {
                let mut grown = v.clone();
                grown.spec.size = want;
                self.store.replace(&grown).await?;
                self.events.normal(
                    c,
                    "Resizing",
                    format!("growing volume {volume} to {want} as the claim asks"),
                );
            }
        }
        if !self.write_status(stored, bound_status(c, v, None)).await? {
            return Ok(Action::RequeueAfter(RETRY_AFTER_RACE));
        }
        Ok(Action::Done)
    }

    /// For a bound ordinal claim: the number it holds, if its ordinal key now names another
    /// claim.
    async fn ordinal_taken_over(&self, c: &Claim) -> Result<Option<u32>, SchedulerError> {
        let (Some(group), Some(n)) = (
            c.spec
                .group
                .as_deref()
                .filter(|_| c.spec.strategy == ClaimStrategy::Ordinal),
            c.status.as_ref().and_then(|s| s.ordinal),
        ) else {
            return Ok(None);
        };
        let ordinals = self.store.claim_ordinals(group).await?;
        Ok(match ordinals.get(&n) {
            Some(r) if r.claim != c.metadata.name || r.claim_uid != c.metadata.uid => Some(n),
            _ => None,
        })
    }

    async fn bind_any(
        &self,
        stored: &cobalt_store::Stored<Claim>,
        bound: &BTreeMap<String, ClaimRef>,
    ) -> Result<Action, SchedulerError> {
        let c = &stored.object;
        let volumes = self.volumes.list();
        let alive = self.alive.read().map(|a| a.clone()).unwrap_or_default();
        let (volume, create) = match choose_volume(c, &volumes, bound, &alive) {
            Some(v) => (v.clone(), None),
            None => {
                let name = &c.metadata.name;
                let taken = self.volumes.get(name).is_some() || bound.contains_key(name.as_str());
                match from_template(c, name, None) {
                    Some(t) if !taken => (t.clone(), Some(t)),
                    Some(_) => {
                        let s = unbound_status(
                            c,
                            ClaimPhase::Pending,
                            None,
                            "NameTaken",
                            &format!("no free volume matches {}, and the volume {name} the template would make exists already (it does not match, or another claim holds it)", selector_text(c)),
                        );
                        self.write_status(stored, s).await?;
                        return Ok(Action::Done);
                    }
                    None => {
                        let s = unbound_status(
                            c,
                            ClaimPhase::Pending,
                            None,
                            "NoFreeVolume",
                            &format!(
                                "no free volume matches {}; add spec.create to make one",
                                selector_text(c)
                            ),
                        );
                        self.write_status(stored, s).await?;
                        return Ok(Action::Done);
                    }
                }
            }
        };
        self.bind(stored, volume, create, None).await
    }

    async fn bind_ordinal(
        &self,
        stored: &cobalt_store::Stored<Claim>,
        bound: &BTreeMap<String, ClaimRef>,
        claims: &Cache<Claim>,
    ) -> Result<Action, SchedulerError> {
        let c = &stored.object;
        let Some(group) = c.spec.group.clone() else {
            return Ok(Action::Done); // refused by validation
        };
        let ordinals = self.store.claim_ordinals(&group).await?;
        let held = self.held();
        let (n, revision) = choose_ordinal(&c.metadata.name, &ordinals, |r| {
            claims.get(&r.claim).is_some_and(|o| {
                o.metadata.uid == r.claim_uid
                    && is_live(&o, &held)
                    && o.status.as_ref().and_then(|s| s.ordinal).is_some()
            })
        });
        let label = n.to_string();
        let numbered = self.volumes.list().into_iter().find(|v| {
            !v.metadata.is_deleting()
                && v.metadata.labels.has(GROUP_LABEL, &group)
                && v.metadata.labels.has(ORDINAL_LABEL, &label)
        });
        let name = format!("{group}-{n}");
        let pick: Result<(Volume, Option<Volume>), (&str, String)> = match numbered {
            Some(v) if bound.contains_key(v.metadata.name.as_str()) => Err((
                "VolumeUnavailable",
                format!(
                    "volume {} (ordinal {n}) is still held by its previous claim",
                    v.metadata.name
                ),
            )),
            Some(v) if !c.matches(&v.metadata.labels) => Err((
                "VolumeUnavailable",
                format!(
                    "volume {} (ordinal {n}) does not match {}",
                    v.metadata.name,
                    selector_text(c)
                ),
            )),
            Some(v) => Ok(((*v).clone(), None)),
            None => match from_template(c, &name, Some(n)) {
                Some(_) if self.volumes.get(&name).is_some() => Err((
                    "NameTaken",
                    format!("volume {name} exists but is not labelled {GROUP_LABEL}={group}, {ORDINAL_LABEL}={n}"),
                )),
                Some(t) => Ok((t.clone(), Some(t))),
                None => Err((
                    "NoVolumeForOrdinal",
                    format!("no volume is labelled {GROUP_LABEL}={group}, {ORDINAL_LABEL}={n}; add spec.create to make one"),
                )),
            },
        };
        let (volume, create) = match pick {
            Ok(p) => p,
            Err((reason, message)) => {
                // The claim holds its number while it waits.
                let s = unbound_status(c, ClaimPhase::Pending, Some(n), reason, &message);
                let ok = self
                    .store
                    .bind_claim(Bind {
                        claim: stored,
                        status: s,
                        volume: None,
                        ordinal: Some((group, n, revision)),
                        create: None,
                    })
                    .await?;
                return Ok(Action::RequeueAfter(if ok {
                    Duration::from_secs(1)
                } else {
                    RETRY_AFTER_RACE
                }));
            }
        };
        self.bind(stored, volume, create, Some((group, n, revision)))
            .await
    }

    async fn bind(
        &self,
        stored: &cobalt_store::Stored<Claim>,
        volume: Volume,
        create: Option<Volume>,
        ordinal: Option<(String, u32, i64)>,
    ) -> Result<Action, SchedulerError> {
        let c = &stored.object;
        let n = ordinal.as_ref().map(|o| o.1);
        let status = bound_status(c, &volume, n);
        let ok = self
            .store
            .bind_claim(Bind {
                claim: stored,
                status,
                volume: Some(volume.metadata.name.to_string()),
                ordinal,
                create: create.clone(),
            })
            .await?;
        if !ok {
            return Ok(Action::RequeueAfter(RETRY_AFTER_RACE));
        }
        let made = if create.is_some() {
            " (made from the claim's template)"
        } else {
            ""
        };
        tracing::info!(claim = %c.metadata.name, volume = %volume.metadata.name, ordinal = ?n, "claim bound");
        self.events.normal(
            c,
            "Bound",
            format!("bound to volume {}{made}", volume.metadata.name),
        );
        // Come back to fill in what follows from the volume (uid, endpoint, readiness).
        Ok(Action::RequeueAfter(RETRY_AFTER_RACE))
    }
}

impl Reconciler<Claim> for ClaimBinder {
    type Error = SchedulerError;

    async fn reconcile(
        &self,
        claim: Arc<Claim>,
        ctx: Context<Claim>,
    ) -> Result<Action, SchedulerError> {
        // Decisions are made on a fresh read: the binding compares its revisions.
        let Some(stored) = self.store.get_stored::<Claim>(claim.name()).await? else {
            return Ok(Action::Done);
        };
        let c = &stored.object;
        let bound = self.store.claim_bindings().await?;
        let mine = bound
            .iter()
            .find(|(_, r)| r.claim == c.metadata.name && r.claim_uid == c.metadata.uid)
            .map(|(v, r)| (v.clone(), r.clone()));
        if !is_live(c, &self.held()) {
            if let Some((volume, r)) = &mine {
                self.store.unbind_volume(volume, r).await?;
                tracing::info!(claim = %c.metadata.name, %volume, "claim released: its holder is gone");
                self.events.normal(
                    c,
                    "Released",
                    format!("its holder stopped renewing it; volume {volume} is free again (its data kept)"),
                );
            }
            let was_bound = mine.is_some() || c.phase() != ClaimPhase::Pending;
            let s = if was_bound {
                unbound_status(
                    c,
                    ClaimPhase::Released,
                    None,
                    "HolderGone",
                    "its holder stopped renewing it; the volume is free for another claim",
                )
            } else {
                unbound_status(
                    c,
                    ClaimPhase::Pending,
                    None,
                    "WaitingForHolder",
                    "held claim: waiting for its holder's first renewal",
                )
            };
            self.write_status(&stored, s).await?;
            return Ok(Action::Done);
        }
        if let Some((volume, r)) = &mine {
            if let Some(lost) = self.ordinal_taken_over(c).await? {
                // Its number went to another claim while this one was not live (a holder back
                // just after its hold lapsed): two live claims never share a number, so this one
                // lets go of the volume and is numbered anew.
                self.store.unbind_volume(volume, r).await?;
                let mut s = unbound_status(
                    c,
                    ClaimPhase::Pending,
                    None,
                    "OrdinalTakenOver",
                    &format!("ordinal {lost} went to another claim while this one was not held; taking a new number"),
                );
                s.ordinal = None;
                self.write_status(&stored, s).await?;
                return Ok(Action::RequeueAfter(RETRY_AFTER_RACE));
            }
            return self.keep_bound(&stored, volume, r).await;
        }
        match c.spec.strategy {
            ClaimStrategy::Any => self.bind_any(&stored, &bound).await,
            ClaimStrategy::Ordinal => self.bind_ordinal(&stored, &bound, ctx.cache()).await,
        }
    }
}

/// Re-reads which claims are held; requeues every claim when that changes. After the claims
/// change, also frees the bindings of claims that no longer exist (a deleted claim has no
/// finalizer: its volume is let go here, after a fresh read confirms the claim is gone).
pub async fn poll_holds(
    store: Store,
    fenced: Store,
    claims: Cache<Claim>,
    held: Held,
    requeue: RequeueHandle,
    term: CancellationToken,
) {
    let mut swept_at = None;
    loop {
        match store.held_claims().await {
            Ok(now) => {
                let changed = held.read().map(|h| *h != now).unwrap_or(true);
                if changed {
                    if let Ok(mut h) = held.write() {
                        *h = now;
                    }
                    requeue.requeue_all().await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "claim hold poll failed"),
        }
        // Bindings of deleted claims only appear when claims change: sweep after a change (and
        // once per term), not on every poll.
        let revision = claims.revision();
        if claims.is_ready()
            && swept_at != Some(revision)
            && free_bindings_of_deleted_claims(&store, &fenced, &claims).await
        {
            swept_at = Some(revision);
        }
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(HOLD_POLL) => {}
        }
    }
}

/// Frees the binding of every volume whose claim a fresh read shows gone. True when nothing was
/// left undone.
async fn free_bindings_of_deleted_claims(
    store: &Store,
    fenced: &Store,
    claims: &Cache<Claim>,
) -> bool {
    let Ok(bound) = store.claim_bindings().await else {
        return false;
    };
    let mut complete = true;
    for (volume, r) in bound {
        if claims
            .get(&r.claim)
            .is_some_and(|c| c.metadata.uid == r.claim_uid)
        {
            continue;
        }
        let gone = match store.get::<Claim>(&r.claim).await {
            Ok(Some(c)) => c.metadata.uid != r.claim_uid,
            Ok(None) => true,
            Err(_) => {
                complete = false;
                false
            }
        };
        if gone {
            match fenced.unbind_volume(&volume, &r).await {
                Ok(true) => {
                    tracing::info!(claim = %r.claim, %volume, "claim deleted: its volume is free again (data kept)")
                }
                Ok(false) => {}
                Err(_) => complete = false,
            }
        }
    }
    complete
}

/// Claims a volume change concerns: those bound to it, and every unbound claim (a new or freed
/// volume may satisfy one).
pub fn claims_for_volume(claims: &Cache<Claim>, v: &Volume) -> Vec<String> {
    claims
        .list()
        .iter()
        .filter(|c| {
            c.phase() != ClaimPhase::Bound
                || c.status.as_ref().and_then(|s| s.volume.as_deref())
                    == Some(v.metadata.name.as_str())
        })
        .map(|c| c.metadata.name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::{VolumeSpec, VolumeStatus};

    fn vol(name: &str, labels: &[(&str, &str)], machine: Option<&str>) -> Arc<Volume> {
        let mut v = Volume::new(name, VolumeSpec::default());
        v.metadata.uid = format!("uid-{name}");
        v.metadata.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.status = machine.map(|m| VolumeStatus {
            machine: Some(m.into()),
            ..Default::default()
        });
        Arc::new(v)
    }

    fn r(claim: &str) -> ClaimRef {
        ClaimRef {
            claim: claim.into(),
            claim_uid: format!("uid-{claim}"),
            revision: 7,
        }
    }

    #[test]
    fn any_takes_a_free_matching_volume_on_a_ready_machine_and_claims_spread() {
        let claim = |name: &str| {
            let mut c = Claim::new(name, "10.0.0.7");
            c.spec.selector.insert("app".into(), "web".into());
            c
        };
        let mut vols = vec![
            vol("a", &[("app", "db")], Some("m1")),
            vol("b", &[("app", "web")], Some("m2")),
        ];
        for i in 0..20 {
            vols.push(vol(&format!("w{i:02}"), &[("app", "web")], Some("m1")));
        }
        let alive = BTreeSet::from(["m1".to_string()]);
        let none = BTreeMap::new();
        let c = claim("web-1");
        let first = choose_volume(&c, &vols, &none, &alive).unwrap();
        assert!(
            first.metadata.name.starts_with('w'),
            "matching, on a ready machine"
        );
        assert_eq!(
            choose_volume(&c, &vols, &none, &alive)
                .unwrap()
                .metadata
                .name,
            first.metadata.name,
            "deterministic"
        );
        let taken = BTreeMap::from([(first.metadata.name.to_string(), r("other"))]);
        let next = choose_volume(&c, &vols, &taken, &alive).unwrap();
        assert_ne!(
            next.metadata.name, first.metadata.name,
            "a held volume is never offered"
        );
        let firsts: BTreeSet<String> = (0..10)
            .map(|i| {
                choose_volume(&claim(&format!("host-{i}")), &vols, &none, &alive)
                    .unwrap()
                    .metadata
                    .name
                    .to_string()
            })
            .collect();
        assert!(
            firsts.len() >= 5,
            "claims booting together spread: {firsts:?}"
        );
        let web: Vec<String> = vols
            .iter()
            .filter(|v| v.metadata.labels["app"] == "web")
            .map(|v| v.metadata.name.to_string())
            .collect();
        let all: BTreeMap<String, ClaimRef> = web.into_iter().map(|n| (n, r("x"))).collect();
        assert!(
            choose_volume(&c, &vols, &all, &alive).is_none(),
            "none free: none offered"
        );
    }

    #[test]
    fn a_returning_claim_gets_its_previous_volume_back() {
        let mut c = Claim::new("web-1", "10.0.0.7");
        c.status = Some(ClaimStatus {
            volume_uid: Some("uid-d".into()),
            ..Default::default()
        });
        let vols = vec![vol("c", &[], Some("m1")), vol("d", &[], Some("m2"))];
        let alive = BTreeSet::from(["m1".to_string()]);
        assert_eq!(
            choose_volume(&c, &vols, &BTreeMap::new(), &alive)
                .unwrap()
                .metadata
                .name,
            "d"
        );
    }

    #[test]
    fn ordinals_are_the_lowest_free_number_and_stick_to_a_name() {
        let ords = BTreeMap::from([(1, r("a")), (2, r("b")), (4, r("d"))]);
        let all_live = |_: &ClaimRef| true;
        assert_eq!(choose_ordinal("new", &ords, all_live), (3, 0));
        assert_eq!(
            choose_ordinal("b", &ords, all_live),
            (2, 7),
            "its own number back"
        );
        let b_gone = |r: &ClaimRef| r.claim != "b";
        assert_eq!(
            choose_ordinal("new", &ords, b_gone),
            (2, 7),
            "a dead claim's number is taken over"
        );
        assert_eq!(
            choose_ordinal("x", &BTreeMap::new(), all_live),
            (1, 0),
            "numbering starts at 1"
        );
    }
}
