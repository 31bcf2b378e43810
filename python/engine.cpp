// engram._engine: the prefetch engine (csrc/prefetch/*.h) and the kernels' hash helpers, for Python. Not an
// operator library: the ops stay dispatcher-only (engram.lib.libengram_ops).
#include <torch/extension.h>

#include <string>

#include "csrc/prefetch/layer_queues.h"
#include "kernels/hash.h"
#include "kernels/primes.h"

namespace py = pybind11;
using namespace engram::prefetch;

namespace {

// Joins the workers without the GIL when Python frees the pool: a worker may
// be freeing a numpy-backed table, which takes the GIL.
class PyGatherPool : public GatherPool {
 public:
  using GatherPool::GatherPool;
  ~PyGatherPool() override {
    std::optional<py::gil_scoped_release> release;
    if (Py_IsInitialized() && PyGILState_Check()) release.emplace();
    close();
  }
};

// A Python object kept with a ticket, released under the GIL wherever the
// ticket's last reference goes (a worker thread included).
std::shared_ptr<void> keep(py::object object) {
  return std::shared_ptr<void>(new py::object(std::move(object)), [](void* p) {
    if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "engram helpers that are not operators: the prefetch engine, the hash helpers";
  py::enum_<TaskKind>(m, "TaskKind", "Who made a ticket's rows (csrc/prefetch/ticket.h).")
      .value("GATHER", TaskKind::kGather)
      .value("HASH_AND_GATHER", TaskKind::kHashAndGather)
      .value("PATCH", TaskKind::kPatch)
      .value("DEVICE_GATHER", TaskKind::kDeviceGather);
  py::enum_<Take>(m, "Take", "What LayerQueues.take found.")
      .value("MISS", Take::kMiss)
      .value("FOUND", Take::kFound)
      .value("STALE", Take::kStale);
  py::class_<Staged>(m, "Staged", "A gather's result (csrc/prefetch/gather.h).")
      .def_readonly("rows", &Staged::rows)
      .def_readonly("staged", &Staged::staged)
      .def_readonly("inverse", &Staged::inverse)
      .def_readonly("slots", &Staged::slots)
      .def_readonly("hashed", &Staged::hashed)
      .def_readonly("cache_hits", &Staged::cache_hits)
      .def("__iter__", [](const Staged& s) { return py::iter(py::make_tuple(s.rows, s.staged, s.inverse)); },
           "rows, staged, inverse = staged");
  py::class_<Ticket, std::shared_ptr<Ticket>>(m, "GatherTicket", "The future of one prefetched batch of one layer.")
      .def_static(
          "device_gather",
          [](const at::Tensor& rows) {
            auto ticket = std::make_shared<Ticket>(TaskKind::kDeviceGather);
            ticket->settle(false, Staged{{}, rows});
            return ticket;
          },
          py::arg("rows"), "A batch the caller gathered on a device (table[ids]).")
      .def_property_readonly("kind", &Ticket::kind)
      .def("ready", &Ticket::ready, "True once the gather (and any patch) finished or failed.")
      .def("wait", &Ticket::wait, py::call_guard<py::gil_scoped_release>(),
           "Blocks until done; returns its Staged or raises the worker's error.")
      // The table's state the rows were read at (Stamps: version -1 when unknown).
      .def_property_readonly("table_version", [](Ticket& t) { return t.stamps().table_version; })
      .def_property_readonly("epoch", [](Ticket& t) { return t.stamps().epoch; })
      .def_property_readonly("own_bumps", [](Ticket& t) { return t.stamps().own_bumps; })
      .def_property(
          "payload",
          [](Ticket& t) -> py::object { return t.payload ? *static_cast<py::object*>(t.payload.get()) : py::none(); },
          [](Ticket& t, py::object object) { t.payload = object.is_none() ? nullptr : keep(std::move(object)); },
          "Any Python object the caller keeps with the batch (None by default).");
  py::class_<PyGatherPool>(m, "GatherPool", "Worker threads that deduplicate and gather table rows.")
      .def(py::init<int, int>(), py::arg("num_threads"), py::arg("background_nice") = 5,
           "background_nice: SCHED_BATCH workers with nice raised by this much (Linux); -1: ordinary threads.")
      .def("submit", &PyGatherPool::submit, py::arg("table"), py::arg("ids"), py::arg("pin_memory") = false,
           py::arg("dedup") = true, py::arg("offsets") = py::none(), py::arg("cache_rows") = py::none(),
           py::arg("cache_data") = py::none(), "Queues a gather of table rows (GatherPool::submit).")
      .def("patch", &PyGatherPool::submit_patch, py::arg("ticket"), py::arg("table"), py::arg("changed"),
           py::arg("table_version"), py::arg("epoch"), py::arg("own_bumps"),
           "Queues the re-reading of rows `changed` into a finished gather's staged rows (GatherPool::submit_patch).")
      .def("close", &PyGatherPool::close, py::call_guard<py::gil_scoped_release>(),
           "Cancels queued gathers, finishes running ones, joins the workers.");
  py::class_<LayerQueues>(m, "LayerQueues", "Per layer of a Prefetcher: its LayerSpec and its batches not used yet.")
      .def(py::init<PyGatherPool&, int64_t, int64_t>(), py::arg("pool"), py::arg("num_layers"),
           py::arg("max_pending"), py::keep_alive<1, 2>())
      .def(
          "set_layer",
          [](LayerQueues& q, int64_t index, const at::Tensor& table, const std::optional<at::Tensor>& lookup,
             const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& head_sizes, int64_t pad_id,
             const std::string& family, const std::optional<at::Tensor>& offsets, bool dedup,
             const std::vector<at::Tensor>& watched) {
            const at::Tensor none;
            q.set_layer(index, LayerSpec(table, lookup, keys.value_or(none), head_sizes.value_or(none), pad_id, family,
                                         offsets.value_or(none), dedup, watched));
          },
          py::arg("index"), py::arg("table"), py::arg("lookup") = py::none(), py::arg("keys") = py::none(),
          py::arg("head_sizes") = py::none(), py::arg("pad_id") = 0, py::arg("family") = "",
          py::arg("offsets") = py::none(), py::arg("dedup") = false, py::arg("watched") = std::vector<at::Tensor>{},
          "Sets layer `index`'s spec (LayerSpec, LayerQueues::set_layer); no lookup: nothing is queued.")
      .def("stale", &LayerQueues::stale, "The layers whose spec is missing or stale.")
      .def("set_counters", &LayerQueues::set_counters, py::arg("index"), py::arg("epoch"), py::arg("own_bumps"))
      .def("prefetch", &LayerQueues::prefetch, py::arg("input_ids"),
           "Queues every layer's hashing and gather for input_ids [B, T]; or returns the stale layers.")
      .def("add", &LayerQueues::add, py::arg("index"), py::arg("ticket"), py::arg("input_ids"), py::arg("key"),
           "Queues a batch the caller hashed: its token tensor and hash ids [B, T, K].")
      .def("take", &LayerQueues::take, py::call_guard<py::gil_scoped_release>(), py::arg("index"),
           py::arg("input_ids"), py::arg("hash_ids") = py::none(),
          "(Take, ticket or None, rows or None): layer `index`'s batch of these token ids, else hash ids, removed "
          "and waited for; rows: its staged rows if they are the lookup's output, current (LayerQueues::take).")
      .def("pending", &LayerQueues::pending, py::arg("index"), "Layer `index`'s batches not used yet, oldest first.")
      .def("clear", &LayerQueues::clear, "Drops every pending batch and spec.");
  m.def("head_primes", &engram::head_primes, py::arg("min_size_per_order"), py::arg("heads_per_order"),
        py::arg("num_layers"),
        "Distinct prime head sizes of spec §2, one list of (N-1)*H primes per layer in configured order.");
  m.def(
      "xxh64",
      [](py::bytes data, uint64_t seed) {
        std::string s = data;
        return engram::xxh64(reinterpret_cast<const uint8_t*>(s.data()), s.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of a byte string (the kernels' implementation).");
  m.def("xxh64_ngram_seed", &engram::xxh64_ngram_seed, py::arg("seed"), py::arg("layer_id"), py::arg("order"),
        "Seed of the xxh64 n-gram hash for one (seed, layer id, order).");
}
