//! The broker: groups, their bindings, and routing a published message to every
//! group whose patterns match (C2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use polybus_core::{Error, Kind, Message, Pattern, Result, Topic};

use crate::MemoryOptions;
use crate::group::{Body, Bound, Entry, Group};

/// Route-cache entries kept before the cache is cleared; bounds memory when a
/// service publishes to very many distinct topics.
const ROUTE_CACHE_LIMIT: usize = 10_000;

pub(crate) struct Broker {
    pub(crate) max_payload: usize,
    /// The bound of a group whose subscription names none.
    pub(crate) default_bound: Option<Bound>,
    /// How long a publish waits for room in a full group.
    pub(crate) publish_timeout: Duration,
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

/// A message a full group could not take, handed back with that group.
pub(crate) struct Full {
    pub(crate) group: Arc<Group>,
    pub(crate) message: Message,
}

impl Full {
    /// The bound the group is at: only a bounded group is ever full.
    pub(crate) fn bound(&self) -> Bound {
        self.group
            .bound()
            .expect("only a bounded group is ever full")
    }
}

/// The bound a declaration asks for.
#[derive(Clone, Copy)]
pub(crate) enum Declare {
    /// The subscription named none: the group keeps the bound it has, or takes
    /// the broker's default if new.
    Default,
    /// This bound, which an existing group must already have.
    Bounded(Bound),
    /// Never bounded: a dead-letter store, whose messages the broker holds already.
    Unbounded,
}

/// Brokers opened by name (`memory://name`), so several connections share one.
static NAMED: Mutex<Option<HashMap<String, Weak<Broker>>>> = Mutex::new(None);

impl Broker {
    pub(crate) fn new(options: &MemoryOptions) -> Arc<Self> {
        Arc::new(Broker {
            max_payload: options.max_payload,
            default_bound: options.max_depth.map(|max| Bound {
                max,
                overflow: options.overflow,
            }),
            publish_timeout: options.publish_timeout,
            topology: RwLock::new(Topology::default()),
            seq: AtomicI64::new(0),
        })
    }

    /// The broker called `name`, created on first use (with `options`) and kept
    /// while any connection to it is open.
    pub(crate) fn named(name: &str, options: &MemoryOptions) -> Arc<Self> {
        let mut registry = polybus_core::backend::lock(&NAMED);
        let map = registry.get_or_insert_with(HashMap::new);
        if let Some(broker) = map.get(name).and_then(Weak::upgrade) {
            return broker;
        }
        map.retain(|_, b| b.strong_count() > 0);
        let broker = Broker::new(options);
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

    /// Put `message` on every group `topic` reaches, or on none if one of them
    /// is full: then it is handed back with that group. Unroutable messages are
    /// dropped, as a topic exchange drops them.
    ///
    /// With several groups, all are checked before any is given the message, so
    /// a refused publish is in none of them; two publishers racing for the last
    /// room may both get in and overshoot the bound by one each. (RabbitMQ
    /// instead enqueues to the queues with room and nacks the publish.)
    // The error hands the message back by value, as `PublishError` does;
    // boxing it would allocate each time a full group turns a publish away.
    #[allow(clippy::result_large_err)]
    pub(crate) fn enqueue(&self, topic: &str, message: Message) -> Result<(), Full> {
        let route = self.route(topic);
        if route.groups.is_empty() {
            tracing::trace!(topic, "no group matches; message dropped");
            return Ok(());
        }
        if let [group] = route.groups.as_slice() {
            return group
                .try_push(Entry::new(Body::Owned(message), route.topic.clone()))
                .map_err(|entry| Full {
                    group: group.clone(),
                    message: entry.message.into_message(),
                });
        }
        if let Some(group) = route.groups.iter().find(|g| g.is_full()) {
            return Err(Full {
                group: group.clone(),
                message,
            });
        }
        let message = Arc::new(message);
        for group in &route.groups {
            group.push(Entry::new(
                Body::Shared(message.clone()),
                route.topic.clone(),
            ));
        }
        Ok(())
    }

    /// Put a dead letter straight into the store named `store` (a durable group),
    /// bypassing topic routing, so no wildcard group ever receives it.
    pub(crate) fn dead_letter(&self, store: &str, message: Message, topic: Topic) {
        match self.declare_group(store, true, &[], Declare::Unbounded) {
            Ok(group) => group.push(Entry::new(Body::Owned(message), topic)),
            // Unbounded declarations are never refused.
            Err(e) => tracing::error!(store, error = %e, "dead letter not stored"),
        }
    }

    /// The group `name`, created if new, bound to `patterns` (bindings accumulate,
    /// as queue bindings do on AMQP). An existing group declared with another
    /// bound is refused, as RabbitMQ refuses a queue redeclared with other
    /// arguments (`PRECONDITION_FAILED`).
    pub(crate) fn declare_group(
        &self,
        name: &str,
        durable: bool,
        patterns: &[Pattern],
        bound: Declare,
    ) -> Result<Arc<Group>> {
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        let group = match topology.groups.get(name) {
            Some(group) => {
                if let Declare::Bounded(asked) = bound
                    && group.bound() != Some(asked)
                {
                    return Err(Error::new(
                        Kind::Refused,
                        format!(
                            "group `{name}` exists with {}, and this subscription asks for {}: \
                             a group's bound is fixed when it is declared",
                            describe(group.bound()),
                            describe(Some(asked)),
                        ),
                    ));
                }
                group.clone()
            }
            None => {
                let bound = match bound {
                    Declare::Default => self.default_bound,
                    Declare::Bounded(b) => Some(b),
                    Declare::Unbounded => None,
                };
                let group = Arc::new(Group::new(name.to_owned(), durable, bound));
                topology.groups.insert(name.to_owned(), group.clone());
                group
            }
        };
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
        Ok(group)
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

fn describe(bound: Option<Bound>) -> String {
    match bound {
        Some(b) => format!("max_depth {} ({:?})", b.max, b.overflow),
        None => "no bound".to_owned(),
    }
}
