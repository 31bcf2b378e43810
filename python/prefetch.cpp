// engram._engine bindings of the prefetch engine (csrc/prefetch.h). The only
// translation unit of _engine that includes torch's Python headers.
#include <torch/extension.h>

#include "csrc/prefetch.h"

namespace py = pybind11;
using engram::prefetch::Cache;
using engram::prefetch::GatherPool;
using engram::prefetch::LayerSpec;
using engram::prefetch::Staged;
using engram::prefetch::Ticket;

namespace engram {
namespace {

// Joins the workers without the GIL when Python frees the pool: a worker may
// be freeing a numpy-backed table, which takes the GIL.
class PyGatherPool : public GatherPool {
 public:
  using GatherPool::GatherPool;
  ~PyGatherPool() override {
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release release;
      close();
    } else {
      close();
    }
  }
};

// LayerQueues that also see a layer's Python attributes: each layer's spec
// lists (owner dict, key, object) for the tensors it was built from (a
// module's _buffers entries); one reassigned (the dict holds another object)
// makes the spec stale, like an in-place change does in LayerQueues. Checked
// with the C API in the same call as the prefetch or take.
class PyLayerQueues : public engram::prefetch::LayerQueues {
 public:
  using Owner = std::tuple<py::dict, py::object, py::object>;
  PyLayerQueues(PyGatherPool& pool, int64_t num_layers, int64_t max_pending)
      : LayerQueues(pool, num_layers, max_pending),
        owners_(static_cast<size_t>(std::max<int64_t>(num_layers, 0))),
        table_owners_(owners_.size()) {}

  // owners: of the hash parameters and offsets (changed: token ids cannot
  // decide); table_owners: of the table (changed: the queued rows are void).
  void set_layer_owned(int64_t index, LayerSpec spec, std::vector<Owner> owners, std::vector<Owner> table_owners) {
    set_layer(index, std::move(spec));  // checks index
    owners_[static_cast<size_t>(index)] = std::move(owners);
    table_owners_[static_cast<size_t>(index)] = std::move(table_owners);
  }
  bool same_params(int64_t index) const { return same(owners_[check_index(index)]); }
  bool same_table(int64_t index) const { return same(table_owners_[check_index(index)]); }
  void clear_owned() {
    clear();
    for (auto& owners : owners_) owners.clear();
    for (auto& owners : table_owners_) owners.clear();
  }

 private:
  static bool same(const std::vector<Owner>& owners) {
    for (const auto& [dict, key, object] : owners) {
      PyObject* now = PyDict_GetItemWithError(dict.ptr(), key.ptr());  // borrowed
      if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (now != object.ptr()) return false;
    }
    return true;
  }

  std::vector<std::vector<Owner>> owners_, table_owners_;
};

}  // namespace

void bind_prefetch(py::module_& m) {
  py::class_<Ticket, std::shared_ptr<Ticket>>(m, "GatherTicket", "The future of one submitted gather.")
      .def("ready", &Ticket::ready, "True once the gather finished (or failed).")
      .def("matches", &Ticket::matches, py::arg("input_ids"),
           "Whether input_ids are the token ids this gather was hashed from (submit_layers): same shape and "
           "values, int64 on the CPU.")
      .def_property_readonly("table_version", &Ticket::table_version,
                             "The table's version counter when the gather was queued (submit_layers), else -1.")
      .def_property_readonly("epoch", &Ticket::epoch, "The spec's counters[0] when the gather was queued.")
      .def_property_readonly("own_bumps", &Ticket::own_bumps, "The spec's counters[1] when the gather was queued.")
      .def(
          "wait",
          [](Ticket& t) {
            Staged s;
            {
              py::gil_scoped_release release;
              s = t.wait();
            }
            return py::make_tuple(s.rows, s.staged, s.inverse);
          },
          "Blocks until done; returns (rows, staged, inverse) or raises the worker's error.")
      .def(
          "slots",
          [](Ticket& t) -> std::optional<at::Tensor> {
            at::Tensor s = t.slots();
            return s.defined() ? std::optional<at::Tensor>(s) : std::nullopt;
          },
          "After wait(): a deduplicated gather's cache slot per row (-1: gathered into staged), or None.")
      .def("cache_hits", &Ticket::cache_hits, "After wait(): how many lookups (ids) the hot-row cache served.")
      .def(
          "hashed",
          [](Ticket& t) -> std::optional<at::Tensor> {
            at::Tensor h = t.hashed();
            return h.defined() ? std::optional<at::Tensor>(h) : std::nullopt;
          },
          "After wait(): the hash ids [B, T, K] the worker computed (submit_layers), or None.");
  py::class_<LayerSpec>(m, "LayerSpec",
                        "One layer's part of GatherPool.submit_layers: table, hash parameters, offsets, gather kind.")
      .def(py::init([](const at::Tensor& table, const at::Tensor& lookup, const at::Tensor& keys,
                       const at::Tensor& head_sizes, int64_t pad_id, const std::string& family,
                       const at::Tensor& offsets, bool dedup, bool pin_memory, const std::vector<at::Tensor>& watched,
                       const std::optional<at::Tensor>& counters) {
             return engram::prefetch::make_layer_spec(table, lookup, keys, head_sizes, pad_id, family, offsets, dedup,
                                                      pin_memory, watched, counters.value_or(at::Tensor()));
           }),
           py::arg("table"), py::arg("lookup"), py::arg("keys"),
           py::arg("head_sizes"), py::arg("pad_id"), py::arg("family"), py::arg("offsets"), py::arg("dedup") = false,
           py::arg("pin_memory") = false, py::arg("watched") = std::vector<at::Tensor>{},
           py::arg("counters") = py::none(),
           "table [R, Dh] (contiguous, CPU); lookup, keys [1, *], head_sizes [1, K] and pad_id, family as "
           "engram::ngram_hash takes them for one layer (no offsets); offsets [K] added to each head's ids; "
           "dedup / pin_memory as in submit; watched: the tensors these are copies of (an in-place change "
           "makes the spec stale); counters: int64 [2] stamped on each ticket (epoch, own_bumps). Checked "
           "here, once.")
      .def_static("skipped", &engram::prefetch::skipped_layer_spec, py::arg("table"),
                  "The spec of a layer whose table is not in CPU memory: nothing is queued for it.")
      .def_property_readonly("current", &LayerSpec::current,
                             "False once a watched tensor changed in place since the spec was built.");
  py::class_<PyGatherPool>(m, "GatherPool", "Worker threads that deduplicate and gather table rows.")
      .def(py::init<int, int>(), py::arg("num_threads"), py::arg("background_nice") = 5,
           "background_nice: workers run as SCHED_BATCH threads with nice raised by this much (Linux), so "
           "they do not preempt the model's compute; -1: ordinary threads.")
      .def_property_readonly("num_threads", &PyGatherPool::num_threads)
      .def(
          "submit",
          [](PyGatherPool& pool, const at::Tensor& table, const at::Tensor& ids, bool pin_memory, bool dedup,
             const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& cache_rows,
             const std::optional<at::Tensor>& cache_data) {
            TORCH_CHECK_VALUE(cache_rows.has_value() || !cache_data.has_value(),
                              "engram.Prefetcher: cache_data given without cache_rows");
            Cache cache{cache_rows.value_or(at::Tensor()), cache_data.value_or(at::Tensor())};
            return pool.submit(table, ids, pin_memory, dedup, offsets.value_or(at::Tensor()), cache);
          },
          py::arg("table"), py::arg("ids"), py::arg("pin_memory") = false, py::arg("dedup") = true,
          py::arg("offsets") = py::none(), py::arg("cache_rows") = py::none(), py::arg("cache_data") = py::none(),
          "Queues the gather of table rows `ids` (int64; `offsets` [K], if given, is added to the ids of "
          "each head first), deduplicated (-> rows, staged, inverse) or expanded (-> None, table[ids], None); "
          "with a hot-row cache (sorted `cache_rows`, and `cache_data` = table[cache_rows] for expanded "
          "gathers) cached rows are skipped (deduplicated: see slots()) or copied from cache_data. Returns a "
          "GatherTicket.")
      .def("submit_layers", &PyGatherPool::submit_layers, py::arg("input_ids"), py::arg("specs"),
           "Queues, for token ids input_ids [B, T] (int64, CPU; copied), the hashing and gather of every "
           "layer in `specs` (LayerSpec list) in one call. Returns a GatherTicket per layer, in order; "
           "ticket.matches(ids) tells whether ids are its token ids, and ticket.hashed() (after wait()) "
           "returns its hash ids [B, T, K].")
      .def("patch", &PyGatherPool::submit_patch, py::arg("ticket"), py::arg("table"), py::arg("changed"),
           py::arg("table_version"), py::arg("epoch"), py::arg("own_bumps"),
           "Queues the re-reading of the rows `changed` (int64 [M], CPU) from `table` into a finished gather's "
           "staged rows, and sets its stamps to (table_version, epoch, own_bumps): the table's state after the "
           "update that changed them. The ticket's wait() waits for it. False if the gather failed or is not done.")
      .def("close", &PyGatherPool::close, py::call_guard<py::gil_scoped_release>(),
           "Cancels queued gathers, finishes running ones, joins the workers.");
  py::class_<PyLayerQueues>(m, "LayerQueues",
                            "Per layer of a Prefetcher: its LayerSpec and its prefetched batches not used yet.")
      .def(py::init<PyGatherPool&, int64_t, int64_t>(), py::arg("pool"), py::arg("num_layers"),
           py::arg("max_pending"), py::keep_alive<1, 2>())
      .def_property_readonly("num_layers", &PyLayerQueues::num_layers)
      .def("set_layer", &PyLayerQueues::set_layer_owned, py::arg("index"), py::arg("spec"),
           py::arg("owners") = std::vector<PyLayerQueues::Owner>{},
           py::arg("table_owners") = std::vector<PyLayerQueues::Owner>{},
           "Sets layer `index`'s spec (dropping its queued batches); owners: (dict, key, object) triples whose "
           "dict must still hold that object (e.g. (module._buffers, 'offsets', offsets)), else the spec is "
           "stale and token ids cannot decide; table_owners: the same for the table, else its queued batches "
           "are dropped.")
      .def(
          "prefetch",
          [](PyLayerQueues& q, const at::Tensor& input_ids) {
            std::vector<int64_t> stale;
            for (int64_t i = 0; i < q.num_layers(); ++i) {
              if (!q.same_params(i) || !q.same_table(i)) stale.push_back(i);
            }
            return stale.empty() ? q.prefetch(input_ids) : stale;
          },
          py::arg("input_ids"),
          "Queues every layer's hashing and gather for input_ids [B, T] (int64, CPU) and returns []; or "
          "returns the indices of the layers whose spec is missing or stale, queuing nothing.")
      .def(
          "take",
          [](PyLayerQueues& q, int64_t index, const std::optional<at::Tensor>& input_ids) -> py::tuple {
            using Take = engram::prefetch::LayerQueues::Take;
            if (!q.same_table(index)) {  // the queued rows are another table's
              q.drop(index);
              return py::make_tuple(static_cast<int>(Take::kMiss), py::none());
            }
            if (!q.same_params(index)) return py::make_tuple(static_cast<int>(Take::kCompareHashIds), py::none());
            std::shared_ptr<Ticket> ticket;
            Take found;
            {
              py::gil_scoped_release release;
              found = q.take(index, input_ids.value_or(at::Tensor()), ticket);
            }
            if (found == Take::kClean) return py::make_tuple(static_cast<int>(found), ticket->wait().staged);
            if (found == Take::kChanged) return py::make_tuple(static_cast<int>(found), ticket);
            return py::make_tuple(static_cast<int>(found), py::none());
          },
          py::arg("index"), py::arg("input_ids"),
          "Layer `index`'s prefetched batch of these token ids, removed from its queue and waited for (a "
          "worker's error is raised here): (0, None) none; (1, table[ids]) found and current; (2, ticket) "
          "found, the caller checks it against the table's changes; (3, None) token ids cannot decide "
          "(the layer's hash parameters changed, or ids are not int64 on the CPU): compare hash ids.")
      .def("pending", &PyLayerQueues::pending, py::arg("index"),
           "Layer `index`'s prefetched batches not used yet (tickets, oldest first).")
      .def("remove", &PyLayerQueues::remove, py::arg("index"), py::arg("ticket"))
      .def("clear", &PyLayerQueues::clear_owned, "Drops every pending batch and spec.");
  m.def(
      "gather",
      [](const at::Tensor& table, const at::Tensor& ids, bool pin_memory, bool dedup) {
        engram::prefetch::check_gather_args(table, ids);
        Staged s;
        {
          py::gil_scoped_release release;
          s = dedup ? engram::prefetch::dedup_gather(table, ids, pin_memory)
                    : engram::prefetch::expand_gather(table, ids, pin_memory);
        }
        return py::make_tuple(s.rows, s.staged, s.inverse);
      },
      py::arg("table"), py::arg("ids"), py::arg("pin_memory") = false, py::arg("dedup") = true,
      "The engine's work, synchronously: (rows, table[rows], inverse) or (None, table[ids], None).");
}

}  // namespace engram
