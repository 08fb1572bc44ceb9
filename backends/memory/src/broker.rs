//! The broker: groups, their bindings, and routing a published message to every
//! group whose patterns match (C2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use polybus_core::{Message, Pattern, Topic};

use crate::group::{Entry, Group};

/// Route-cache entries kept before the cache is cleared; bounds memory when a
/// service publishes to very many distinct topics.
const ROUTE_CACHE_LIMIT: usize = 10_000;

pub(crate) struct Broker {
    pub(crate) max_payload: usize,
    topology: RwLock<Topology>,
    seq: AtomicI64,
}

#[derive(Default)]
struct Topology {
    groups: HashMap<String, Arc<Group>>,
    bindings: Vec<(Pattern, Arc<Group>)>,
    /// topic -> the groups it reaches; cleared whenever the bindings change.
    routes: HashMap<Box<str>, Arc<Route>>,
}

pub(crate) struct Route {
    pub(crate) topic: Topic,
    pub(crate) groups: Vec<Arc<Group>>,
}

/// Brokers opened by name (`memory://name`), so several connections share one.
static NAMED: Mutex<Option<HashMap<String, Weak<Broker>>>> = Mutex::new(None);

impl Broker {
    pub(crate) fn new(max_payload: usize) -> Arc<Self> {
        Arc::new(Broker {
            max_payload,
            topology: RwLock::new(Topology::default()),
            seq: AtomicI64::new(0),
        })
    }

    /// The broker called `name`, created on first use and kept while any
    /// connection to it is open.
    pub(crate) fn named(name: &str, max_payload: usize) -> Arc<Self> {
        let mut registry = polybus_core::backend::lock(&NAMED);
        let map = registry.get_or_insert_with(HashMap::new);
        if let Some(broker) = map.get(name).and_then(Weak::upgrade) {
            return broker;
        }
        map.retain(|_, b| b.strong_count() > 0);
        let broker = Broker::new(max_payload);
        map.insert(name.to_owned(), Arc::downgrade(&broker));
        broker
    }

    pub(crate) fn next_seq(&self) -> i64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The groups `topic` reaches, from the cache when possible.
    pub(crate) fn route(&self, topic: &str) -> Arc<Route> {
        {
            let topology = self.topology.read().unwrap_or_else(|p| p.into_inner());
            if let Some(route) = topology.routes.get(topic) {
                return route.clone();
            }
        }
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        let mut groups: Vec<Arc<Group>> = Vec::new();
        for (pattern, group) in &topology.bindings {
            if pattern.matches(topic) && !groups.iter().any(|g| Arc::ptr_eq(g, group)) {
                groups.push(group.clone());
            }
        }
        let route = Arc::new(Route {
            // The caller validated the topic; a failure here is a bug in that check.
            topic: Topic::new(topic).expect("topic validated before routing"),
            groups,
        });
        if topology.routes.len() >= ROUTE_CACHE_LIMIT {
            topology.routes.clear();
        }
        topology.routes.insert(topic.into(), route.clone());
        route
    }

    /// Put `message` on every group `topic` reaches. Unroutable messages are
    /// dropped, as a topic exchange drops them.
    pub(crate) fn enqueue(&self, topic: &str, message: Message) {
        let route = self.route(topic);
        if route.groups.is_empty() {
            tracing::trace!(topic, "no group matches; message dropped");
            return;
        }
        let message = Arc::new(message);
        for group in &route.groups {
            group.push(Entry::new(message.clone(), route.topic.clone()));
        }
    }

    /// Put a dead letter straight into the store named `store` (a durable group),
    /// bypassing topic routing, so no wildcard group ever receives it.
    pub(crate) fn dead_letter(&self, store: &str, message: Message, topic: Topic) {
        let group = self.declare_group(store, true, &[]);
        group.push(Entry::new(Arc::new(message), topic));
    }

    /// The group `name`, created if new, bound to `patterns` (bindings accumulate,
    /// as queue bindings do on AMQP).
    pub(crate) fn declare_group(
        &self,
        name: &str,
        durable: bool,
        patterns: &[Pattern],
    ) -> Arc<Group> {
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        let group = topology
            .groups
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Group::new(name.to_owned(), durable)))
            .clone();
        let mut changed = false;
        for pattern in patterns {
            let bound = topology
                .bindings
                .iter()
                .any(|(p, g)| p == pattern && Arc::ptr_eq(g, &group));
            if !bound {
                topology.bindings.push((pattern.clone(), group.clone()));
                changed = true;
            }
        }
        if changed {
            topology.routes.clear();
        }
        group
    }

    /// Forget an ephemeral group whose last member left.
    pub(crate) fn delete_group(&self, group: &Arc<Group>) {
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        if topology
            .groups
            .get(group.name())
            .is_some_and(|g| Arc::ptr_eq(g, group))
        {
            topology.groups.remove(group.name());
        }
        topology.bindings.retain(|(_, g)| !Arc::ptr_eq(g, group));
        topology.routes.clear();
    }

    pub(crate) fn group_names(&self) -> Vec<String> {
        let topology = self.topology.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = topology.groups.keys().cloned().collect();
        names.sort();
        names
    }

    /// The group called `name`, for inspection.
    pub(crate) fn group(&self, name: &str) -> Option<Arc<Group>> {
        let topology = self.topology.read().unwrap_or_else(|p| p.into_inner());
        topology.groups.get(name).cloned()
    }
}
