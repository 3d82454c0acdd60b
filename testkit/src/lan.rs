//! A test LAN: a bridge on the test machine (10.214.N.1/24) and hosts in network namespaces
//! attached to it (10.214.N.<id>), so daemons run as separate machines with their own addresses
//! and a host's cable can be pulled ([`LanHost::link`]). Everything is deleted on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Output};

use crate::{ip, ip_must, require};

pub struct Lan {
    bridge: String,
    subnet: u8,
    tag: String,
}

pub struct LanHost {
    pub ns: String,
    host_if: String,
    pub addr: Ipv4Addr,
}

impl Lan {
    pub fn new() -> Lan {
        require("ip");
        let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr"]).stdout).into_owned();
        let pid = std::process::id();
        let subnet = (0..250u32)
            .map(|i| 1 + ((pid + i) % 250) as u8)
            .find(|n| !used.contains(&format!("10.214.{n}.")))
            .expect("a free test subnet");
        let tag = format!("{}", pid % 100_000);
        let bridge = format!("cb{tag}");
        // A fixed MAC: a bridge otherwise takes the lowest MAC of its ports, so attaching a
        // host can change the gateway's MAC under hosts that already cached it in ARP, which
        // then time out for ~30 s.
        let mac = format!(
            "02:cb:{:02x}:{:02x}:{:02x}:01",
            (pid >> 16) & 0xff,
            (pid >> 8) & 0xff,
            pid & 0xff
        );
        ip_must(&["link", "add", &bridge, "address", &mac, "type", "bridge"]);
        ip_must(&[
            "addr",
            "add",
            &format!("10.214.{subnet}.1/24"),
            "dev",
            &bridge,
        ]);
        ip_must(&["link", "set", &bridge, "up"]);
        Lan {
            bridge,
            subnet,
            tag,
        }
    }

    /// The test machine's own address on the LAN (where etcd and controllers listen).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 214, self.subnet, 1)
    }

    /// A host with address 10.214.N.`id` (`id` in 2..=250).
    pub fn host(&self, id: u8) -> LanHost {
        let ns = format!("cobalt-{}-{id}", self.tag);
        let (host_if, peer) = (format!("lh{}{id}", self.tag), format!("lp{}{id}", self.tag));
        let addr = Ipv4Addr::new(10, 214, self.subnet, id);
        ip_must(&["netns", "add", &ns]);
        let h = LanHost {
            ns: ns.clone(),
            host_if: host_if.clone(),
            addr,
        };
        ip_must(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip_must(&["link", "set", &peer, "netns", &ns]);
        ip_must(&["link", "set", &host_if, "master", &self.bridge]);
        ip_must(&["link", "set", &host_if, "up"]);
        ip_must(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ]);
        ip_must(&["-n", &ns, "link", "set", &peer, "up"]);
        ip_must(&["-n", &ns, "link", "set", "lo", "up"]);
        h
    }
}

impl Default for Lan {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

impl LanHost {
    /// An NFS client that runs from inside this host (export rules see its address).
    pub fn nfs(&self) -> crate::nfs::NfsClient {
        crate::nfs::NfsClient::in_netns(&self.ns)
    }

    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs `program args…` inside, bounded to 30 s.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", "30", program])
            .args(args)
            .output()
            .expect("run in netns")
    }

    /// Pulls (`false`) or plugs back (`true`) the host's cable.
    pub fn link(&self, up: bool) {
        ip_must(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for LanHost {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
