//! Drain and rebalance as a pure planner beside placement: given the machines (their ledger),
//! the provisioned volumes with the moves in flight, and the machines being drained, propose
//! moves. No etcd, no clock — unit- and property-tested.
//!
//! **Drain** (`spec.drain` on a Machine): every volume held there is proposed a target chosen by
//! placement (spread), among machines that are ready, not cordoned, not draining, can receive
//! streams and satisfy the volume's selector and capabilities. A volume the user pinned
//! (`spec.machine` set by hand) blocks the drain with a reason, unless the drain says to move
//! pinned volumes too (then it is re-pinned to its new machine). A volume nothing can take is
//! reported blocked with placement's reason; nothing is moved that cannot be placed.
//!
//! **Rebalance**: when the fill (reserved ÷ reservable) of the fullest and the emptiest eligible
//! machine differ by more than `spread_percent`, one volume moves from the fullest to the emptiest
//! — the one that narrows the spread most, and only if it narrows it by at least
//! `min_gain_percent` (so a plan applied and planned again proposes nothing new). Pinned
//! volumes, volumes moved within the cooldown and volumes already moving are left alone. Nothing
//! is rebalanced while a machine is NotReady or a move is stalled.
//!
//! **Bounds**: at most `max_out` moves from and `max_in` moves to any machine at once, at most
//! `max_moves` and `max_bytes` in flight in the cluster — counting moves already under way. A
//! move reserves on both ends until it finishes, so the plan counts both.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cobalt_api::Capability;
use serde::{Deserialize, Serialize};

use super::placement::{place, Decision, MachineView, Request, STREAM_NEEDS};
use crate::config::PlacementStrategy;

/// The controller's `rebalance:` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Policy {
    /// Move volumes between machines to even out their fill (drains run regardless). Only
    /// with the `spread` placement strategy: `binpack` fills machines on purpose.
    pub enabled: bool,
    /// Act when fullest − emptiest fill exceeds this many percentage points.
    pub spread_percent: f64,
    /// A rebalancing move must narrow the spread by at least this many points.
    pub min_gain_percent: f64,
    /// Moves out of one machine at once.
    pub max_out: usize,
    /// Moves into one machine at once.
    pub max_in: usize,
    /// Moves in flight in the cluster.
    pub max_moves: usize,
    /// Bytes in flight in the cluster.
    pub max_bytes: u64,
    /// Seconds a volume is left alone by rebalancing after it moved.
    pub cooldown_seconds: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            spread_percent: 20.0,
            min_gain_percent: 5.0,
            max_out: 1,
            max_in: 1,
            max_moves: 4,
            max_bytes: 256 << 30,
            cooldown_seconds: 600,
        }
    }
}

/// What the planner needs of one provisioned volume.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeView {
    pub name: String,
    /// Where its data is.
    pub holder: String,
    /// A move asked for (`spec.machine`), if it differs from `holder`.
    pub target: Option<String>,
    /// The move to `target` is granted (the ledger already counts it there).
    pub granted: bool,
    /// Bytes it reserves.
    pub bytes: u64,
    /// `spec.machine` was set by a user.
    pub pinned: bool,
    pub selector: BTreeMap<String, String>,
    /// Capabilities its data needs on any machine.
    pub needs: Vec<Capability>,
    /// Moved within the cooldown.
    pub cooling: bool,
    /// Its move is not progressing.
    pub stalled: bool,
    /// A grow its machine could not grant: the bytes the grown volume would reserve.
    pub grow_to: Option<u64>,
    /// Snapshots it holds: moves do not carry snapshots, so it stays where it is.
    pub snapshots: usize,
}

/// A machine being drained.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainView {
    pub machine: String,
    /// Move pinned volumes too (re-pinning them where they go).
    pub pinned_too: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Drain,
    /// A grow that does not fit where the volume is: it moves where the grown size fits.
    Grow,
    Rebalance,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Drain => "drain",
            Reason::Grow => "grow",
            Reason::Rebalance => "rebalance",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub volume: String,
    pub from: String,
    pub to: String,
    pub bytes: u64,
    pub reason: Reason,
}

/// Where a drain is.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainProgress {
    pub machine: String,
    /// Volumes still held there.
    pub left: usize,
    /// Of those, moving now (proposed in this plan or before).
    pub moving: usize,
    /// Volumes that cannot go, with why.
    pub blocked: Vec<(String, String)>,
}

impl DrainProgress {
    pub fn done(&self) -> bool {
        self.left == 0
    }

    /// The Drained condition's message.
    pub fn message(&self) -> String {
        if self.left == 0 {
            return format!("machine {} holds no volumes", self.machine);
        }
        let mut m = format!(
            "{} volume{} left, {} moving",
            self.left,
            if self.left == 1 { "" } else { "s" },
            self.moving
        );
        if !self.blocked.is_empty() {
            let list: Vec<String> = self
                .blocked
                .iter()
                .map(|(v, why)| format!("{v} ({why})"))
                .collect();
            m.push_str(&format!(
                "; {} blocked: {}",
                self.blocked.len(),
                list.join("; ")
            ));
        }
        m
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub proposals: Vec<Proposal>,
    pub drains: Vec<DrainProgress>,
    /// Why rebalancing did nothing, when it was due to act.
    pub idle: Option<String>,
}

/// Reservable capacity of a machine: total × maxFill%.
fn cap(m: &MachineView) -> u64 {
    (m.total_bytes as u128 * m.max_fill_percent.min(100) as u128 / 100) as u64
}

/// Fill in percent of the reservable capacity.
fn fill(reserved: u64, m: &MachineView) -> f64 {
    match cap(m) {
        0 => 100.0,
        c => reserved as f64 * 100.0 / c as f64,
    }
}

fn streams(m: &MachineView) -> bool {
    STREAM_NEEDS.iter().all(|c| m.capabilities.contains(c))
}

struct Budget<'p> {
    policy: &'p Policy,
    out: HashMap<String, usize>,
    into: HashMap<String, usize>,
    moves: usize,
    bytes: u64,
}

impl Budget<'_> {
    fn room(&self, from: &str, to: Option<&str>, bytes: u64) -> bool {
        self.moves < self.policy.max_moves
            && self.bytes.saturating_add(bytes) <= self.policy.max_bytes
            && self.out.get(from).copied().unwrap_or(0) < self.policy.max_out
            && to.is_none_or(|t| self.into.get(t).copied().unwrap_or(0) < self.policy.max_in)
    }

    fn take(&mut self, from: &str, to: &str, bytes: u64) {
        *self.out.entry(from.to_string()).or_default() += 1;
        *self.into.entry(to.to_string()).or_default() += 1;
        self.moves += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// Proposes moves; see the module documentation for the rules.
pub fn plan(
    machines: &[MachineView],
    volumes: &[VolumeView],
    drains: &[DrainView],
    policy: &Policy,
) -> Plan {
    let mut m: Vec<MachineView> = machines.to_vec();
    let index: HashMap<String, usize> = m
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.clone(), i))
        .collect();
    let mut budget = Budget {
        policy,
        out: HashMap::new(),
        into: HashMap::new(),
        moves: 0,
        bytes: 0,
    };
    for v in volumes {
        if let Some(t) = &v.target {
            budget.take(&v.holder, t, v.bytes);
            // A move asked for but not granted yet will reserve on its target.
            if !v.granted {
                if let Some(&i) = index.get(t) {
                    m[i].reserved_bytes += v.bytes;
                }
            }
        }
    }
    let draining: BTreeSet<&str> = drains.iter().map(|d| d.machine.as_str()).collect();
    let mut plan = Plan::default();
    let mut moved: BTreeSet<String> = BTreeSet::new();

    for d in drains {
        let mut progress = DrainProgress {
            machine: d.machine.clone(),
            left: 0,
            moving: 0,
            blocked: Vec::new(),
        };
        let mut mine: Vec<&VolumeView> = volumes.iter().filter(|v| v.holder == d.machine).collect();
        mine.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        for v in mine {
            progress.left += 1;
            if v.target.is_some() {
                progress.moving += 1;
                continue;
            }
            if v.snapshots > 0 {
                progress.blocked.push((
                    v.name.clone(),
                    format!(
                        "holds {} snapshot{} here, and moves do not carry snapshots; delete them to move it",
                        v.snapshots,
                        if v.snapshots == 1 { "" } else { "s" }
                    ),
                ));
                continue;
            }
            if v.pinned && !d.pinned_too {
                progress.blocked.push((
                    v.name.clone(),
                    "pinned by a user to this machine; drain with --pinned to move it too".into(),
                ));
                continue;
            }
            if !budget.room(&d.machine, None, v.bytes) {
                continue; // waits for a slot
            }
            let candidates: Vec<MachineView> = m
                .iter()
                .filter(|c| c.name != d.machine && !draining.contains(c.name.as_str()))
                .filter(|c| budget.room(&d.machine, Some(&c.name), v.bytes))
                .cloned()
                .collect();
            let mut needs = v.needs.clone();
            needs.extend(STREAM_NEEDS);
            let request = Request {
                name: v.name.clone(),
                reserved_bytes: v.bytes,
                selector: if v.pinned {
                    BTreeMap::new()
                } else {
                    v.selector.clone()
                },
                required_machine: None,
                needs,
            };
            if candidates.is_empty() {
                continue; // every target is busy receiving: wait
            }
            match place(PlacementStrategy::Spread, &request, &candidates) {
                Decision::Bind(to) => {
                    if let Some(&i) = index.get(&to) {
                        m[i].reserved_bytes += v.bytes;
                    }
                    budget.take(&d.machine, &to, v.bytes);
                    progress.moving += 1;
                    moved.insert(v.name.clone());
                    plan.proposals.push(Proposal {
                        volume: v.name.clone(),
                        from: d.machine.clone(),
                        to,
                        bytes: v.bytes,
                        reason: Reason::Drain,
                    });
                }
                Decision::Unschedulable(why) => progress.blocked.push((v.name.clone(), why)),
            }
        }
        plan.drains.push(progress);
    }

    // Grow beyond the machine: an unpinned volume whose grow was refused moves to a machine
    // where the grown size fits (and is granted there).
    for v in volumes {
        let Some(want) = v.grow_to else { continue };
        if v.pinned
            || v.snapshots > 0
            || v.target.is_some()
            || v.cooling
            || moved.contains(&v.name)
            || draining.contains(v.holder.as_str())
            || !budget.room(&v.holder, None, want)
        {
            continue;
        }
        let candidates: Vec<MachineView> = m
            .iter()
            .filter(|c| c.name != v.holder && !draining.contains(c.name.as_str()))
            .filter(|c| budget.room(&v.holder, Some(&c.name), want))
            .cloned()
            .collect();
        let mut needs = v.needs.clone();
        needs.extend(STREAM_NEEDS);
        let request = Request {
            name: v.name.clone(),
            reserved_bytes: want,
            selector: v.selector.clone(),
            required_machine: None,
            needs,
        };
        if let Decision::Bind(to) = place(PlacementStrategy::Spread, &request, &candidates) {
            if let Some(&i) = index.get(&to) {
                m[i].reserved_bytes += want;
            }
            budget.take(&v.holder, &to, want);
            moved.insert(v.name.clone());
            plan.proposals.push(Proposal {
                volume: v.name.clone(),
                from: v.holder.clone(),
                to,
                bytes: want,
                reason: Reason::Grow,
            });
        }
    }

    if !policy.enabled {
        return plan;
    }
    if let Some(down) = m.iter().find(|x| !x.ready) {
        plan.idle = Some(format!("machine {} is not ready", down.name));
        return plan;
    }
    if let Some(v) = volumes.iter().find(|v| v.stalled) {
        plan.idle = Some(format!("the move of volume {} is stalled", v.name));
        return plan;
    }
    let eligible: Vec<usize> = (0..m.len())
        .filter(|&i| {
            let x = &m[i];
            !x.unschedulable && !draining.contains(x.name.as_str()) && cap(x) > 0 && streams(x)
        })
        .collect();
    if eligible.len() < 2 {
        return plan;
    }
    let spread_of = |m: &[MachineView]| -> (f64, usize, usize) {
        let mut lo = (f64::MAX, 0);
        let mut hi = (f64::MIN, 0);
        for &i in &eligible {
            let f = fill(m[i].reserved_bytes, &m[i]);
            if f > hi.0 || (f == hi.0 && m[i].name < m[hi.1].name) {
                hi = (f, i);
            }
            if f < lo.0 || (f == lo.0 && m[i].name < m[lo.1].name) {
                lo = (f, i);
            }
        }
        (hi.0 - lo.0, hi.1, lo.1)
    };
    // Bytes held on each machine by volumes that could move (holder counts; targets of
    // in-flight moves counted above stay).
    loop {
        let (spread, full, empty) = spread_of(&m);
        if spread <= policy.spread_percent {
            break;
        }
        let (from, to) = (m[full].name.clone(), m[empty].name.clone());
        if !budget.room(&from, Some(&to), 0) {
            plan.idle = Some(format!(
                "waiting for moves in flight to finish (machine {from} → {to})"
            ));
            break;
        }
        let mut best: Option<(f64, &VolumeView)> = None;
        for v in volumes.iter().filter(|v| {
            v.holder == from
                && v.target.is_none()
                && !v.pinned
                && v.snapshots == 0
                && !v.cooling
                && !moved.contains(&v.name)
                && v.bytes <= m[empty].reservable_bytes()
                && v.selector
                    .iter()
                    .all(|(k, val)| m[empty].labels.has(k, val))
                && v.needs.iter().all(|c| m[empty].capabilities.contains(c))
                && budget.room(&from, Some(&to), v.bytes)
        }) {
            // After the move the source no longer holds it; the target does.
            let mut after = m.clone();
            after[full].reserved_bytes = after[full].reserved_bytes.saturating_sub(v.bytes);
            after[empty].reserved_bytes += v.bytes;
            let (s, _, _) = spread_of(&after);
            if best.is_none_or(|(b, bv)| s < b || (s == b && v.name < bv.name)) {
                best = Some((s, v));
            }
        }
        let Some((after, v)) = best else {
            plan.idle = Some(format!(
                "no volume on machine {from} can move to {to} and narrow the spread"
            ));
            break;
        };
        if spread - after < policy.min_gain_percent {
            break;
        }
        // In flight it reserves on both ends.
        m[empty].reserved_bytes += v.bytes;
        budget.take(&from, &to, v.bytes);
        moved.insert(v.name.clone());
        plan.proposals.push(Proposal {
            volume: v.name.clone(),
            from,
            to,
            bytes: v.bytes,
            reason: Reason::Rebalance,
        });
    }
    plan
}

/// The fill spread (percentage points) among machines that rebalancing considers.
pub fn spread(machines: &[MachineView], drains: &[DrainView]) -> f64 {
    let fills: Vec<f64> = machines
        .iter()
        .filter(|x| {
            !x.unschedulable
                && cap(x) > 0
                && streams(x)
                && !drains.iter().any(|d| d.machine == x.name)
        })
        .map(|x| fill(x.reserved_bytes, x))
        .collect();
    if fills.len() < 2 {
        return 0.0;
    }
    let hi = fills.iter().cloned().fold(f64::MIN, f64::max);
    let lo = fills.iter().cloned().fold(f64::MAX, f64::min);
    hi - lo
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn machine(name: &str, total_gib: u64) -> MachineView {
        MachineView {
            name: name.into(),
            labels: Default::default(),
            ready: true,
            unschedulable: false,
            total_bytes: total_gib * GIB,
            max_fill_percent: 100,
            reserved_bytes: 0,
            capabilities: vec![Capability::Snapshot, Capability::SendReceive],
        }
    }

    fn volume(name: &str, on: &str, gib: u64) -> VolumeView {
        VolumeView {
            name: name.into(),
            holder: on.into(),
            target: None,
            granted: false,
            bytes: gib * GIB,
            pinned: false,
            selector: BTreeMap::new(),
            needs: vec![],
            cooling: false,
            stalled: false,
            grow_to: None,
            snapshots: 0,
        }
    }

    /// Machines with reservations as the ledger counts them (holder and move targets).
    fn ledger(machines: &[MachineView], volumes: &[VolumeView]) -> Vec<MachineView> {
        let mut m = machines.to_vec();
        for x in m.iter_mut() {
            x.reserved_bytes = volumes
                .iter()
                .filter(|v| {
                    v.holder == x.name || (v.granted && v.target.as_deref() == Some(&x.name))
                })
                .map(|v| v.bytes)
                .sum();
        }
        m
    }

    fn drain(machine: &str) -> DrainView {
        DrainView {
            machine: machine.into(),
            pinned_too: false,
        }
    }

    #[test]
    fn a_drain_moves_every_volume_it_can_one_at_a_time_and_says_what_is_blocked() {
        let machines = [machine("a", 100), machine("b", 100), machine("c", 100)];
        let mut volumes = vec![
            volume("v1", "a", 10),
            volume("v2", "a", 5),
            volume("v3", "a", 1),
        ];
        volumes[2].pinned = true;
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[drain("a")],
            &Policy::default(),
        );
        assert_eq!(p.proposals.len(), 1, "one move out of a at a time: {p:?}");
        assert_eq!(p.proposals[0].volume, "v1", "largest first");
        assert_eq!(p.proposals[0].reason, Reason::Drain);
        let d = &p.drains[0];
        assert_eq!((d.left, d.moving), (3, 1));
        assert_eq!(d.blocked.len(), 1);
        assert!(
            d.message().contains("v3") && d.message().contains("pinned"),
            "{}",
            d.message()
        );
        // With --pinned the pinned one may go too.
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[DrainView {
                machine: "a".into(),
                pinned_too: true,
            }],
            &Policy {
                max_out: 10,
                max_in: 10,
                ..Policy::default()
            },
        );
        assert_eq!(p.proposals.len(), 3);
        assert!(p.drains[0].blocked.is_empty());
        assert!(p.proposals.iter().all(|x| x.to != "a"));
    }

    #[test]
    fn a_drain_that_cannot_place_a_volume_moves_nothing_for_it_and_says_why() {
        let machines = [machine("a", 100), machine("b", 10)];
        let volumes = vec![volume("big", "a", 50)];
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[drain("a")],
            &Policy::default(),
        );
        assert!(p.proposals.is_empty());
        let (v, why) = &p.drains[0].blocked[0];
        assert_eq!(v, "big");
        assert!(why.contains("insufficient capacity"), "{why}");
    }

    #[test]
    fn a_drained_machine_with_nothing_left_is_done() {
        let machines = [machine("a", 100), machine("b", 100)];
        let p = plan(&machines, &[], &[drain("a")], &Policy::default());
        assert!(p.drains[0].done());
        assert!(p.drains[0].message().contains("no volumes"));
    }

    #[test]
    fn rebalancing_moves_from_the_fullest_to_the_emptiest_and_stops_under_the_threshold() {
        let machines = [machine("a", 100), machine("b", 100), machine("new", 100)];
        let volumes: Vec<VolumeView> = (0..6)
            .map(|i| volume(&format!("v{i}"), if i < 4 { "a" } else { "b" }, 10))
            .collect();
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[],
            &Policy::default(),
        );
        assert_eq!(p.proposals.len(), 1, "{p:?}");
        assert_eq!(
            (p.proposals[0].from.as_str(), p.proposals[0].to.as_str()),
            ("a", "new")
        );
        // Balanced enough: nothing.
        let even: Vec<VolumeView> = (0..3)
            .map(|i| volume(&format!("v{i}"), ["a", "b", "new"][i], 10))
            .collect();
        assert!(
            plan(&ledger(&machines, &even), &even, &[], &Policy::default())
                .proposals
                .is_empty()
        );
        // Off, or a machine down, or a stalled move: nothing.
        let off = Policy {
            enabled: false,
            ..Policy::default()
        };
        assert!(plan(&ledger(&machines, &volumes), &volumes, &[], &off)
            .proposals
            .is_empty());
        let mut down = ledger(&machines, &volumes);
        down[1].ready = false;
        let p = plan(&down, &volumes, &[], &Policy::default());
        assert!(p.proposals.is_empty());
        assert!(p.idle.unwrap().contains("not ready"));
    }

    #[test]
    fn a_grow_that_does_not_fit_moves_an_unpinned_volume_where_it_fits_and_never_a_pinned_one() {
        let machines = [machine("a", 100), machine("b", 100)];
        let mut volumes = vec![volume("filler", "a", 60), volume("grower", "a", 20)];
        volumes[1].grow_to = Some(50 * GIB);
        let off = Policy {
            enabled: false,
            ..Policy::default()
        };
        let p = plan(&ledger(&machines, &volumes), &volumes, &[], &off);
        assert_eq!(p.proposals.len(), 1);
        let x = &p.proposals[0];
        assert_eq!(
            (x.volume.as_str(), x.to.as_str(), x.reason),
            ("grower", "b", Reason::Grow)
        );
        assert_eq!(x.bytes, 50 * GIB, "room for the grown size");
        volumes[1].pinned = true;
        assert!(plan(&ledger(&machines, &volumes), &volumes, &[], &off)
            .proposals
            .is_empty());
        // Nowhere it fits: it stays.
        volumes[1].pinned = false;
        volumes[1].grow_to = Some(150 * GIB);
        assert!(plan(&ledger(&machines, &volumes), &volumes, &[], &off)
            .proposals
            .is_empty());
    }

    #[test]
    fn a_volume_with_snapshots_blocks_its_drain_and_is_never_rebalanced() {
        let machines = vec![machine("a", 100), machine("b", 100)];
        let mut volumes = vec![volume("snap", "a", 10), volume("free", "a", 10)];
        volumes[0].snapshots = 2;
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[DrainView {
                machine: "a".into(),
                pinned_too: true,
            }],
            &Policy::default(),
        );
        assert!(p.proposals.iter().all(|x| x.volume != "snap"), "{p:?}");
        let blocked = &p.drains[0].blocked;
        assert!(
            blocked
                .iter()
                .any(|(v, why)| v == "snap" && why.contains("2 snapshots")),
            "{blocked:?}"
        );
        // Lopsided machines: only the volume without snapshots may move.
        let machines = vec![machine("a", 100), machine("b", 100)];
        let mut volumes: Vec<VolumeView> =
            (0..6).map(|i| volume(&format!("v{i}"), "a", 10)).collect();
        for v in volumes.iter_mut() {
            v.snapshots = 1;
        }
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[],
            &Policy {
                enabled: true,
                ..Policy::default()
            },
        );
        assert!(p.proposals.is_empty(), "{p:?}");
    }

    #[test]
    fn pinned_cooling_and_moving_volumes_are_not_rebalanced() {
        let machines = [machine("a", 100), machine("b", 100)];
        let mut volumes = vec![
            volume("p", "a", 30),
            volume("c", "a", 30),
            volume("m", "a", 30),
        ];
        volumes[0].pinned = true;
        volumes[1].cooling = true;
        volumes[2].target = Some("b".into());
        volumes[2].granted = true;
        let p = plan(
            &ledger(&machines, &volumes),
            &volumes,
            &[],
            &Policy::default(),
        );
        assert!(p.proposals.is_empty(), "{p:?}");
    }

    /// A small deterministic generator (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    #[test]
    fn over_random_clusters_plans_never_overcommit_never_move_pinned_volumes_and_converge() {
        for seed in 1..300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let n = 2 + rng.next(5) as usize;
            let machines: Vec<MachineView> = (0..n)
                .map(|i| {
                    let mut m = machine(&format!("m{i}"), 50 + rng.next(100));
                    m.max_fill_percent = 80 + rng.next(21) as u8;
                    if rng.next(5) == 0 {
                        m.labels.insert("disk".into(), "ssd".into());
                    }
                    m
                })
                .collect();
            let mut volumes: Vec<VolumeView> = Vec::new();
            for i in 0..rng.next(30) {
                let mut v = volume(
                    &format!("v{i}"),
                    &format!("m{}", rng.next(n as u64)),
                    1 + rng.next(15),
                );
                v.pinned = rng.next(6) == 0;
                if rng.next(8) == 0 {
                    v.selector.insert("disk".into(), "ssd".into());
                }
                // Only volumes that fit where they are.
                let holder = machines.iter().find(|m| m.name == v.holder).unwrap();
                let held: u64 = volumes
                    .iter()
                    .filter(|x| x.holder == v.holder)
                    .map(|x| x.bytes)
                    .sum();
                if held + v.bytes <= cap(holder) {
                    volumes.push(v);
                }
            }
            let drains: Vec<DrainView> = if rng.next(3) == 0 {
                vec![DrainView {
                    machine: "m0".into(),
                    pinned_too: rng.next(2) == 0,
                }]
            } else {
                vec![]
            };
            let policy = Policy::default();
            let mut last_spread = f64::MAX;
            let mut rounds = 0;
            loop {
                rounds += 1;
                assert!(rounds < 200, "seed {seed}: no convergence");
                let view = ledger(&machines, &volumes);
                let p = plan(&view, &volumes, &drains, &policy);
                // Never overcommits, counting both ends while in flight.
                let mut inflight = volumes.clone();
                for x in &p.proposals {
                    let v = inflight.iter_mut().find(|v| v.name == x.volume).unwrap();
                    assert!(
                        !v.pinned || drains.iter().any(|d| d.machine == x.from && d.pinned_too),
                        "seed {seed}: moved pinned {}",
                        v.name
                    );
                    assert_ne!(x.from, x.to);
                    v.target = Some(x.to.clone());
                    v.granted = true;
                }
                for m in ledger(&machines, &inflight) {
                    let before = view
                        .iter()
                        .find(|b| b.name == m.name)
                        .unwrap()
                        .reserved_bytes;
                    assert!(
                        m.reserved_bytes <= cap(&m).max(before),
                        "seed {seed}: {} overcommitted",
                        m.name
                    );
                }
                if p.proposals.is_empty() {
                    break;
                }
                // The moves finish.
                for x in &p.proposals {
                    let v = volumes.iter_mut().find(|v| v.name == x.volume).unwrap();
                    v.holder = x.to.clone();
                    if x.reason == Reason::Rebalance {
                        v.cooling = false;
                    }
                }
                if p.proposals.iter().all(|x| x.reason == Reason::Rebalance) && drains.is_empty() {
                    let s = spread(&ledger(&machines, &volumes), &drains);
                    assert!(
                        s <= last_spread + 1e-9,
                        "seed {seed}: spread grew {last_spread} → {s}"
                    );
                    last_spread = s;
                }
            }
            // Converged: planning again proposes nothing (no ping-pong), and a drain either
            // emptied its machine or names what blocks it.
            let view = ledger(&machines, &volumes);
            assert!(plan(&view, &volumes, &drains, &policy).proposals.is_empty());
            for d in plan(&view, &volumes, &drains, &policy).drains {
                assert_eq!(d.left, d.blocked.len(), "seed {seed}: {d:?}");
            }
        }
    }
}
