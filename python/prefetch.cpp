// engram._engine bindings of the prefetch engine (csrc/prefetch.h). The only
// translation unit of _engine that includes torch's Python headers.
#include <torch/extension.h>

#include "csrc/prefetch.h"

namespace py = pybind11;
using engram::prefetch::Cache;
using engram::prefetch::GatherPool;
using engram::prefetch::HashSpec;
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

}  // namespace

void bind_prefetch(py::module_& m) {
  py::class_<Ticket, std::shared_ptr<Ticket>>(m, "GatherTicket", "The future of one submitted gather.")
      .def("ready", &Ticket::ready, "True once the gather finished (or failed).")
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
          "After wait(): the hash ids [B, T, K] the worker computed (submit_hashed), or None.");
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
      .def(
          "submit_hashed",
          [](PyGatherPool& pool, const at::Tensor& table, const at::Tensor& input_ids, const at::Tensor& lookup,
             const at::Tensor& keys, const at::Tensor& head_sizes, int64_t pad_id, const std::string& family,
             const at::Tensor& offsets, bool pin_memory, bool dedup) {
            HashSpec hash{input_ids, lookup, keys, head_sizes, pad_id, family};
            return pool.submit(table, at::Tensor(), pin_memory, dedup, offsets, {}, hash);
          },
          py::arg("table"), py::arg("input_ids"), py::arg("lookup"), py::arg("keys"), py::arg("head_sizes"),
          py::arg("pad_id"), py::arg("family"), py::arg("offsets"), py::arg("pin_memory") = false,
          py::arg("dedup") = false,
          "Like submit, but the worker first hashes input_ids [B, T] for one layer (engram::ngram_hash with "
          "keys [1, *] and head_sizes [1, K], no offsets): the caller does not wait for the hash. The "
          "ticket's hashed() returns the hash ids.")
      .def("close", &PyGatherPool::close, py::call_guard<py::gil_scoped_release>(),
           "Cancels queued gathers, finishes running ones, joins the workers.");
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
