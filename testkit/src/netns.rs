//! A client host in its own network namespace, linked to the test machine by a veth pair on a
//! private /24 of its own (10.213.N.0/24: the host side is .1, the client .2). Commands run
//! inside with [`ClientHost::run`]. The namespace and link are deleted on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{ip, ip_must, require};

pub struct ClientHost {
    ns: String,
    host_if: String,
    /// The client's own address (what export rules see).
    pub addr: Ipv4Addr,
    /// The test machine's address on this link (where the client reaches servers).
    pub gateway: Ipv4Addr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl ClientHost {
    /// An NFS client that runs from inside this host (export rules see its address).
    pub fn nfs(&self) -> crate::nfs::NfsClient {
        crate::nfs::NfsClient::in_netns(&self.ns)
    }

    pub fn new() -> ClientHost {
        require("ip");
        let pid = std::process::id();
        let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr"]).stdout).into_owned();
        // A subnet no other test (in this or another process) is using.
        let n = (0..250)
            .map(|i| 1 + (pid + i + 37 * NEXT.fetch_add(1, Ordering::SeqCst)) % 250)
            .find(|n| !used.contains(&format!("10.213.{n}.")))
            .expect("a free 10.213.N.0/24 test subnet");
        let tag = format!("{}{}", pid % 100_000, NEXT.fetch_add(1, Ordering::SeqCst));
        let ns = format!("cobalt-c{tag}");
        let (host_if, client_if) = (format!("vh{tag}"), format!("vc{tag}"));
        let gateway = Ipv4Addr::new(10, 213, n as u8, 1);
        let addr = Ipv4Addr::new(10, 213, n as u8, 2);
        ip_must(&["netns", "add", &ns]);
        let host = ClientHost {
            ns: ns.clone(),
            host_if: host_if.clone(),
            addr,
            gateway,
        };
        ip_must(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &client_if,
        ]);
        ip_must(&["link", "set", &client_if, "netns", &ns]);
        ip_must(&["addr", "add", &format!("{gateway}/24"), "dev", &host_if]);
        ip_must(&["link", "set", &host_if, "up"]);
        ip_must(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &client_if,
        ]);
        ip_must(&["-n", &ns, "link", "set", &client_if, "up"]);
        ip_must(&["-n", &ns, "link", "set", "lo", "up"]);
        host
    }

    /// Runs `program args…` inside the namespace.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", "30", program])
            .args(args)
            .output()
            .expect("run in netns")
    }

    /// Cuts (`false`) or restores (`true`) the link, like pulling the cable.
    pub fn link(&self, up: bool) {
        ip_must(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Default for ClientHost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
