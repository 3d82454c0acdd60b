//! Placement as a pure function over a snapshot: which machine a volume goes to, or why none
//! can take it. No etcd, no clock — unit- and property-tested.
//!
//! A machine is **eligible** when it is Ready, not cordoned (`unschedulable`), its labels satisfy
//! the volume's selector, and its reservable capacity (total × maxFill% − reserved) covers the
//! volume's reservation (size × (1 + dilation%)). Among eligible machines:
//! - `binpack` picks the one left with the *least* reservable bytes (fill machines up), and a
//!   batch is placed first-fit-decreasing (largest reservation first);
//! - `spread` picks the one left with the *most* (balance load).
//!
//! A machine must also declare every backend capability the volume's spec needs (compression
//! other than none, a clone source): a volume asking for compression is never placed on a
//! backend that cannot compress, and the Unschedulable message names the missing capability.
//!
//! Ties go to the machine whose name sorts first, so decisions are deterministic. A clone goes to
//! the machine holding its source, or nowhere.

use std::collections::{BTreeMap, HashMap};

use cobalt_api::Capability;

use crate::config::PlacementStrategy;

/// What placement needs to know of one machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MachineView {
    pub name: String,
    pub labels: cobalt_api::StringMap,
    pub ready: bool,
    pub unschedulable: bool,
    pub total_bytes: u64,
    pub max_fill_percent: u8,
    /// Sum of reservations of volumes bound to it.
    pub reserved_bytes: u64,
    /// What its backend can do.
    pub capabilities: Vec<Capability>,
}

impl MachineView {
    /// Bytes still reservable: total × maxFill% − reserved (0 when overcommitted).
    pub fn reservable_bytes(&self) -> u64 {
        let cap = (self.total_bytes as u128 * self.max_fill_percent.min(100) as u128 / 100) as u64;
        cap.saturating_sub(self.reserved_bytes)
    }
}

/// What placement needs to know of one volume.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub name: String,
    pub reserved_bytes: u64,
    pub selector: BTreeMap<String, String>,
    /// For a clone: the machine holding the source; for a restore: the snapshot's machine.
    pub required_machine: Option<String>,
    /// Backend capabilities the spec needs.
    pub needs: Vec<Capability>,
}

impl Request {
    fn served_by(&self, m: &MachineView) -> Result<(), Capability> {
        match self.needs.iter().find(|c| !m.capabilities.contains(c)) {
            Some(c) => Err(*c),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Bind(String),
    /// No machine can take it; the message sums up why.
    Unschedulable(String),
}

/// Why machines were passed over, counted for the message.
#[derive(Default)]
struct Rejections {
    not_ready: usize,
    cordoned: usize,
    selector: usize,
    capacity: usize,
    not_source: usize,
    /// Machines lacking a capability the volume needs, by capability.
    lacking: BTreeMap<Capability, usize>,
}

impl Rejections {
    fn message(&self, total: usize) -> String {
        if total == 0 {
            return "no machines are registered".into();
        }
        let parts: Vec<String> = [
            (self.not_ready, "not ready"),
            (self.cordoned, "unschedulable (cordoned)"),
            (self.selector, "selector mismatch"),
            (self.capacity, "insufficient capacity"),
            (
                self.not_source,
                "not holding the source (clone or snapshot)",
            ),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, why)| format!("{n} {why}"))
        .chain(
            self.lacking
                .iter()
                .map(|(c, n)| format!("{n} whose backend lacks the {c} capability")),
        )
        .collect();
        format!(
            "{total} machine{}: {}",
            if total == 1 { "" } else { "s" },
            parts.join(", ")
        )
    }
}

/// Places one volume. Does not change `machines`.
///
/// A clone goes to its source's machine when that machine can take it. When it cannot (no
/// room, or the clone's selector excludes it), the clone goes to another machine that can take
/// it and receive streams, provided the source's machine can send them: that machine's agent
/// seeds the clone from a snapshot of the source, which keeps serving.
pub fn place(strategy: PlacementStrategy, request: &Request, machines: &[MachineView]) -> Decision {
    let here = place_one(strategy, request, machines);
    // Only a clone can be seeded elsewhere; a restore is made where its snapshot is.
    let (Some(source), true) = (
        &request.required_machine,
        request.needs.contains(&Capability::Clone),
    ) else {
        return here;
    };
    let Decision::Unschedulable(why_here) = &here else {
        return here;
    };
    let streams = |m: &MachineView| STREAM_NEEDS.iter().all(|c| m.capabilities.contains(c));
    if !machines
        .iter()
        .any(|m| m.name == *source && m.ready && streams(m))
    {
        return here;
    }
    let mut elsewhere = request.clone();
    elsewhere.required_machine = None;
    elsewhere.needs.retain(|c| *c != Capability::Clone);
    elsewhere.needs.extend(STREAM_NEEDS);
    let others: Vec<MachineView> = machines
        .iter()
        .filter(|m| m.name != *source)
        .cloned()
        .collect();
    match place_one(strategy, &elsewhere, &others) {
        Decision::Bind(m) => Decision::Bind(m),
        Decision::Unschedulable(why) => Decision::Unschedulable(format!(
            "on the source's machine: {why_here}; elsewhere (seeded from a snapshot of the source): {why}"
        )),
    }
}

/// What a machine needs to send or receive a volume's content.
pub const STREAM_NEEDS: [Capability; 2] = [Capability::Snapshot, Capability::SendReceive];

fn place_one(strategy: PlacementStrategy, request: &Request, machines: &[MachineView]) -> Decision {
    let mut why = Rejections::default();
    let mut best: Option<(&MachineView, u64)> = None;
    for m in machines {
        if !m.ready {
            why.not_ready += 1;
        } else if m.unschedulable {
            why.cordoned += 1;
        } else if request
            .required_machine
            .as_ref()
            .is_some_and(|r| *r != m.name)
        {
            why.not_source += 1;
        } else if !request.selector.iter().all(|(k, v)| m.labels.has(k, v)) {
            why.selector += 1;
        } else if let Err(c) = request.served_by(m) {
            *why.lacking.entry(c).or_default() += 1;
        } else if m.reservable_bytes() < request.reserved_bytes {
            why.capacity += 1;
        } else {
            let left = m.reservable_bytes() - request.reserved_bytes;
            let better = match best {
                None => true,
                Some((b, b_left)) => match strategy {
                    PlacementStrategy::Binpack => (left, &m.name) < (b_left, &b.name),
                    PlacementStrategy::Spread => {
                        left > b_left || (left == b_left && m.name < b.name)
                    }
                },
            };
            if better {
                best = Some((m, left));
            }
        }
    }
    match best {
        Some((m, _)) => Decision::Bind(m.name.clone()),
        None => Decision::Unschedulable(why.message(machines.len())),
    }
}

/// Places a batch, reserving as it goes so the batch never overcommits. Requests are taken
/// largest first (first-fit-decreasing), ties by name. Returns decisions in that order.
///
/// Decides exactly as calling [`place`] for each request in turn would (a property test checks
/// this), but faster at scale: machines are put in name order once, the machines a selector
/// admits (ready, not cordoned, labels match) are computed once per distinct selector, and each
/// decision only compares the cached reservable bytes of those candidates. Volumes nothing can
/// take — and clones, which name their machine — go through [`place`] for its message.
pub fn place_batch(
    strategy: PlacementStrategy,
    mut requests: Vec<Request>,
    machines: &mut [MachineView],
) -> Vec<(String, Decision)> {
    requests.sort_by(|a, b| {
        b.reserved_bytes
            .cmp(&a.reserved_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut by_name: Vec<usize> = (0..machines.len()).collect();
    by_name.sort_by(|&a, &b| machines[a].name.cmp(&machines[b].name));
    // Reservable bytes by position in name order, kept current as the batch reserves.
    let mut reservable: Vec<u64> = by_name
        .iter()
        .map(|&i| machines[i].reservable_bytes())
        .collect();
    type Key = (BTreeMap<String, String>, Vec<Capability>);
    let mut candidates: HashMap<Key, Vec<u32>> = HashMap::new();
    let mut out = Vec::with_capacity(requests.len());
    for request in requests {
        let mut chosen = None;
        if request.required_machine.is_none() {
            let key = (request.selector.clone(), request.needs.clone());
            if !candidates.contains_key(&key) {
                let admitted = by_name
                    .iter()
                    .enumerate()
                    .filter(|(_, &i)| {
                        let m = &machines[i];
                        m.ready
                            && !m.unschedulable
                            && request.selector.iter().all(|(k, v)| m.labels.has(k, v))
                            && request.served_by(m).is_ok()
                    })
                    .map(|(pos, _)| pos as u32)
                    .collect();
                candidates.insert(key.clone(), admitted);
            }
            chosen = best_candidate(
                strategy,
                &candidates[&key],
                &reservable,
                request.reserved_bytes,
            );
        }
        let decision = match chosen {
            Some(pos) => Decision::Bind(machines[by_name[pos]].name.clone()),
            None => place(strategy, &request, machines),
        };
        if let Decision::Bind(name) = &decision {
            let pos = match chosen {
                Some(pos) => pos,
                None => by_name
                    .binary_search_by(|&i| machines[i].name.as_str().cmp(name))
                    .expect("placed on a known machine"),
            };
            let m = &mut machines[by_name[pos]];
            m.reserved_bytes += request.reserved_bytes;
            reservable[pos] = m.reservable_bytes();
        }
        out.push((request.name, decision));
    }
    out
}

/// The best candidate position for `need` bytes: binpack takes the least left over, spread the
/// most; candidates are in name order and only a strictly better one replaces the first found,
/// so ties go to the name that sorts first, as in [`place`].
fn best_candidate(
    strategy: PlacementStrategy,
    candidates: &[u32],
    reservable: &[u64],
    need: u64,
) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for &pos in candidates {
        let free = reservable[pos as usize];
        if free < need {
            continue;
        }
        let left = free - need;
        let better = match (best, strategy) {
            (None, _) => true,
            (Some((_, b)), PlacementStrategy::Binpack) => left < b,
            (Some((_, b)), PlacementStrategy::Spread) => left > b,
        };
        if better {
            best = Some((pos as usize, left));
        }
    }
    best.map(|(pos, _)| pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn machine(name: &str, total_gib: u64, reserved_gib: u64) -> MachineView {
        MachineView {
            name: name.into(),
            labels: Default::default(),
            ready: true,
            unschedulable: false,
            total_bytes: total_gib * GIB,
            max_fill_percent: 100,
            reserved_bytes: reserved_gib * GIB,
            capabilities: vec![Capability::Compression, Capability::Clone],
        }
    }

    fn request(name: &str, gib: u64) -> Request {
        Request {
            name: name.into(),
            reserved_bytes: gib * GIB,
            selector: BTreeMap::new(),
            required_machine: None,
            needs: vec![],
        }
    }

    #[test]
    fn binpack_fills_the_fullest_machine_that_fits_and_spread_the_emptiest() {
        let machines = [
            machine("a", 100, 10),
            machine("b", 100, 80),
            machine("c", 100, 95),
        ];
        let r = request("v", 10);
        assert_eq!(
            place(PlacementStrategy::Binpack, &r, &machines),
            Decision::Bind("b".into())
        );
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &machines),
            Decision::Bind("a".into())
        );
    }

    #[test]
    fn a_volume_needing_compression_goes_only_where_the_backend_compresses_and_says_so() {
        let mut plain = machine("a", 100, 0);
        plain.capabilities.clear();
        let mut r = request("v", 1);
        r.needs = vec![Capability::Compression];
        match place(PlacementStrategy::Spread, &r, std::slice::from_ref(&plain)) {
            Decision::Unschedulable(m) => {
                assert!(m.contains("lacks the compression capability"), "{m}")
            }
            d => panic!("{d:?}"),
        }
        let machines = [plain, machine("b", 100, 90)];
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &machines),
            Decision::Bind("b".into())
        );
        let mut batch = machines.to_vec();
        assert_eq!(
            place_batch(PlacementStrategy::Spread, vec![r], &mut batch),
            [("v".to_string(), Decision::Bind("b".into()))]
        );
    }

    #[test]
    fn ties_are_broken_by_name() {
        let machines = [
            machine("z", 100, 0),
            machine("m", 100, 0),
            machine("a", 100, 0),
        ];
        for s in [PlacementStrategy::Binpack, PlacementStrategy::Spread] {
            assert_eq!(
                place(s, &request("v", 1), &machines),
                Decision::Bind("a".into())
            );
        }
    }

    #[test]
    fn ineligible_machines_are_summed_up_in_the_message() {
        let mut cordoned = machine("c", 100, 0);
        cordoned.unschedulable = true;
        let mut down = machine("d", 100, 0);
        down.ready = false;
        let mut hdd = machine("h", 100, 0);
        hdd.labels.insert("disk".into(), "hdd".into());
        let mut full = machine("f", 10, 0);
        full.labels.insert("disk".into(), "ssd".into());
        let mut r = request("v", 20);
        r.selector.insert("disk".into(), "ssd".into());
        let Decision::Unschedulable(msg) = place(
            PlacementStrategy::Binpack,
            &r,
            &[cordoned, down, hdd, full.clone(), full],
        ) else {
            panic!()
        };
        assert_eq!(msg, "5 machines: 1 not ready, 1 unschedulable (cordoned), 1 selector mismatch, 2 insufficient capacity");
        assert_eq!(
            place(PlacementStrategy::Binpack, &r, &[]),
            Decision::Unschedulable("no machines are registered".into())
        );
    }

    #[test]
    fn max_fill_limits_what_can_be_reserved() {
        let mut m = machine("a", 100, 0);
        m.max_fill_percent = 90;
        assert_eq!(m.reservable_bytes(), 90 * GIB);
        assert!(matches!(
            place(PlacementStrategy::Binpack, &request("v", 91), &[m.clone()]),
            Decision::Unschedulable(_)
        ));
        assert_eq!(
            place(PlacementStrategy::Binpack, &request("v", 90), &[m]),
            Decision::Bind("a".into())
        );
    }

    #[test]
    fn a_clone_that_does_not_fit_its_sources_machine_is_seeded_elsewhere_if_both_can_stream() {
        let streams = vec![
            Capability::Clone,
            Capability::Snapshot,
            Capability::SendReceive,
        ];
        let mut a = machine("a", 100, 0);
        let mut b = machine("b", 100, 99);
        a.capabilities = streams.clone();
        b.capabilities = streams.clone();
        let mut r = request("clone", 5);
        r.required_machine = Some("b".into());
        r.needs = vec![Capability::Clone];
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &[a.clone(), b.clone()]),
            Decision::Bind("a".into()),
            "no room beside the source: seeded on a"
        );
        // A target that cannot receive is no use.
        let mut plain = a.clone();
        plain.capabilities.clear();
        let d = place(PlacementStrategy::Spread, &r, &[plain, b.clone()]);
        assert!(
            matches!(&d, Decision::Unschedulable(m) if m.contains("elsewhere") && m.contains("snapshot")),
            "{d:?}"
        );
        // The source's machine with room still gets it.
        b.reserved_bytes = 0;
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &[a, b]),
            Decision::Bind("b".into())
        );
    }

    #[test]
    fn a_restore_goes_only_where_its_snapshot_is_never_seeded_elsewhere() {
        let all = vec![
            Capability::Clone,
            Capability::Snapshot,
            Capability::SendReceive,
        ];
        let mut a = machine("a", 100, 0);
        let mut b = machine("b", 100, 99);
        a.capabilities = all.clone();
        b.capabilities = all;
        let mut r = request("restore", 5);
        r.required_machine = Some("b".into());
        r.needs = vec![Capability::Snapshot];
        let d = place(PlacementStrategy::Spread, &r, &[a.clone(), b.clone()]);
        assert!(
            matches!(&d, Decision::Unschedulable(m) if m.contains("not holding the source")),
            "{d:?}"
        );
        b.reserved_bytes = 0;
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &[a, b]),
            Decision::Bind("b".into())
        );
    }

    #[test]
    fn a_clone_goes_to_its_sources_machine_or_nowhere() {
        let machines = [machine("a", 100, 0), machine("b", 100, 99)];
        let mut r = request("clone", 5);
        r.required_machine = Some("b".into());
        assert!(
            matches!(place(PlacementStrategy::Spread, &r, &machines), Decision::Unschedulable(m) if m.contains("insufficient capacity"))
        );
        r.reserved_bytes = GIB;
        assert_eq!(
            place(PlacementStrategy::Spread, &r, &machines),
            Decision::Bind("b".into())
        );
    }

    #[test]
    fn first_fit_decreasing_packs_a_batch_that_first_come_first_served_would_not() {
        // Two 60 GiB machines; volumes 20, 20, 40, 40 (total 120): FFD fits all four.
        let mut machines = vec![machine("a", 60, 0), machine("b", 60, 0)];
        let batch = vec![
            request("s1", 20),
            request("s2", 20),
            request("l1", 40),
            request("l2", 40),
        ];
        let decisions = place_batch(PlacementStrategy::Binpack, batch, &mut machines);
        assert!(
            decisions
                .iter()
                .all(|(_, d)| matches!(d, Decision::Bind(_))),
            "{decisions:?}"
        );
        assert!(machines.iter().all(|m| m.reservable_bytes() == 0));
    }

    /// A tiny deterministic generator, so the property tests need no extra crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn property_batches_never_overcommit_always_respect_selectors_and_are_deterministic() {
        let mut rng = Lcg(7);
        for round in 0..300 {
            let machines: Vec<MachineView> = (0..1 + rng.next(8))
                .map(|i| {
                    // Names in random order, so name-order tie-breaking is exercised.
                    let mut m = machine(&format!("m{}-{i}", rng.next(100)), 1 + rng.next(200), 0);
                    m.reserved_bytes = rng.next(m.total_bytes / GIB + 1) * GIB / 2;
                    m.max_fill_percent = 50 + rng.next(51) as u8;
                    m.ready = rng.next(10) > 0;
                    m.unschedulable = rng.next(10) == 0;
                    if rng.next(2) == 0 {
                        m.labels.insert("disk".into(), "ssd".into());
                    }
                    if rng.next(4) == 0 {
                        m.capabilities.clear();
                    }
                    m
                })
                .collect();
            let requests: Vec<Request> = (0..rng.next(40))
                .map(|i| {
                    let mut r = request(&format!("v{i}"), 1 + rng.next(50));
                    if rng.next(3) == 0 {
                        r.selector.insert("disk".into(), "ssd".into());
                    }
                    if rng.next(4) == 0 {
                        r.needs.push(Capability::Compression);
                    }
                    if rng.next(8) == 0 {
                        let k = rng.next(machines.len() as u64) as usize;
                        r.required_machine = Some(machines[k].name.clone());
                    }
                    r
                })
                .collect();
            for strategy in [PlacementStrategy::Binpack, PlacementStrategy::Spread] {
                let before: Vec<u64> = machines.iter().map(|m| m.reserved_bytes).collect();
                let mut after = machines.clone();
                let decisions = place_batch(strategy, requests.clone(), &mut after);
                let mut again = machines.clone();
                assert_eq!(
                    decisions,
                    place_batch(strategy, requests.clone(), &mut again),
                    "round {round}: not deterministic"
                );
                // The indexed batch decides exactly as the reference, one `place` at a time.
                let mut reference = machines.clone();
                let mut sorted = requests.clone();
                sorted.sort_by(|a, b| {
                    b.reserved_bytes
                        .cmp(&a.reserved_bytes)
                        .then_with(|| a.name.cmp(&b.name))
                });
                let expected: Vec<(String, Decision)> = sorted
                    .into_iter()
                    .map(|r| {
                        let d = place(strategy, &r, &reference);
                        if let Decision::Bind(name) = &d {
                            let m = reference.iter_mut().find(|m| &m.name == name).unwrap();
                            m.reserved_bytes += r.reserved_bytes;
                        }
                        (r.name, d)
                    })
                    .collect();
                assert_eq!(decisions, expected, "round {round}: differs from place()");
                assert_eq!(after, reference, "round {round}: ledgers differ");
                for (i, m) in after.iter().enumerate() {
                    let cap = (m.total_bytes as u128 * m.max_fill_percent as u128 / 100) as u64;
                    let added = m.reserved_bytes - before[i];
                    assert!(
                        added == 0 || m.reserved_bytes <= cap.max(before[i]),
                        "round {round}: {} overcommitted",
                        m.name
                    );
                }
                for (name, d) in &decisions {
                    let r = requests.iter().find(|r| &r.name == name).unwrap();
                    if let Decision::Bind(machine) = d {
                        let m = machines.iter().find(|m| &m.name == machine).unwrap();
                        assert!(m.ready && !m.unschedulable, "round {round}");
                        assert!(
                            r.selector.iter().all(|(k, v)| m.labels.has(k, v)),
                            "round {round}: selector ignored"
                        );
                        assert!(
                            r.needs.iter().all(|c| m.capabilities.contains(c)),
                            "round {round}: capability ignored"
                        );
                    }
                }
            }
        }
    }
}
