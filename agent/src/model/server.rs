//! llama-server's own flow: tasks posted, taken by slots, released.

use super::origin::Origin;

/// Work handed to llama-server's task queue (`server_queue::post`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskPost {
    pub origin: Origin,
    /// Pushed to the front (llama-server does so for cancel tasks only).
    pub front: bool,
    /// Size of the posted task vector in bytes (a multiple of `sizeof(server_task)`).
    pub tasks_bytes: u64,
    /// Tasks posted, when the layout knows `sizeof(server_task)`.
    pub n_tasks: Option<u32>,
    /// The tasks read (all of them, up to `probe_common::MAX_POST_TASKS`; the first only when
    /// `n_tasks` is unknown).
    pub tasks: Vec<PostedTask>,
}

/// One task of a post.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PostedTask {
    /// `server_task::id` (-1: unreadable).
    pub id: i32,
    /// Its type's label (`completion`, `embedding`, `rerank`, `infill`, `cancel`, or `unknown`).
    #[serde(rename = "type")]
    pub task_type: &'static str,
    /// For a cancel: the task it cancels (-1 otherwise).
    pub id_target: i32,
}

/// A llama-server slot took a task from the queue (`launch_slot_with_task`), or refused it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotLaunch {
    pub origin: Origin,
    /// The sequence id of the slot's batches: its id (+ 1 in 2024 builds, whose sequence 0
    /// held the system prompt; -1 if unreadable).
    pub slot_id: i32,
    pub task_id: i32,
    /// false: the task was refused (an invalid request, answered with an error).
    pub ok: bool,
    /// The slot's target context (0: unreadable).
    pub ctx: u64,
    /// The slot's draft context (0: none, or unreadable).
    pub ctx_dft: u64,
}

/// A llama-server slot let its task go (`server_slot::release`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotRelease {
    pub origin: Origin,
    /// The sequence id of the slot's batches: its id (+ 1 in 2024 builds, whose sequence 0
    /// held the system prompt; -1 if unreadable).
    pub slot_id: i32,
    /// The task it held (-1: none, or unreadable with this build's layout).
    pub task_id: i32,
}
