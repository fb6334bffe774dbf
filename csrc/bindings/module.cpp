// pybind11 bindings: fastserve._core. Every call that can block or touches
// more than a handful of bytes releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>

#include "fastserve/device.h"
#include "fastserve/errors.h"
#include "fastserve/scheduler.h"

namespace py = pybind11;
using namespace fastserve;

namespace fastserve {
void register_kernels(py::module_& m);  // csrc/bindings/kernels.cpp
}

namespace {

PyObject* g_base_error = nullptr;
PyObject* g_queue_full = nullptr;
PyObject* g_overloaded = nullptr;
PyObject* g_closed = nullptr;

PyObject* new_exception(py::module_& m, const char* name, PyObject* bases, const char* doc) {
  std::string qual = std::string("fastserve.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qual.c_str(), doc, bases, nullptr);
  if (!cls) throw py::error_already_set();
  m.add_object(name, py::handle(cls));  // the module keeps a reference; so do we (never freed)
  Py_INCREF(cls);
  return cls;
}

// Zero-copy numpy view of a vector owned by `owner` (a Batch), which the
// array keeps alive through its base.
template <class T>
py::array view(const std::vector<T>& v, std::vector<py::ssize_t> shape, py::handle owner) {
  return py::array_t<T>(std::move(shape), const_cast<T*>(v.data()), owner);
}

// Build a config struct from keyword arguments naming its fields; unknown
// names are a TypeError rather than silently ignored.
template <class Config>
Config config_from_kwargs(const py::kwargs& kw) {
  Config c;
  py::object o = py::cast(&c, py::return_value_policy::reference);
  for (auto item : kw) {
    auto key = item.first.cast<std::string>();
    if (!py::hasattr(o, key.c_str()))
      throw py::type_error("unknown option '" + key + "' for " +
                           py::str(py::type::of(o).attr("__name__")).cast<std::string>());
    py::setattr(o, key.c_str(), item.second);
  }
  return c;
}

// Token ids: a 1-D sequence or array of integers in [0, 2^31). Floats are
// refused rather than truncated; a uint64 past int64 wraps negative and an
// int past uint64 makes an object array: both are refused.
//
// A list or tuple of plain Python ints (what a tokenizer gives) is read
// directly: through a numpy array a submit of 128 ids took 3.6 us against
// 0.7, and a list's submit_many of 4,096 lists 4.9 ms against 0.9, with the
// GIL held (benchmarks/README.md, "One request's host work, and the tokenizer"). Anything else, and any
// item that is not a plain int in range (a bool, a numpy int, a float, a
// negative or huge id), goes through the array path, which gives the errors.
bool plain_tokens(PyObject* seq, std::vector<int32_t>& out) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
    if (overflow != 0 || v < 0 || v > std::numeric_limits<int32_t>::max()) return false;
    out[static_cast<size_t>(i)] = static_cast<int32_t>(v);
  }
  return true;
}

std::vector<int32_t> tokens_from(const py::object& obj) {
  if (PyList_CheckExact(obj.ptr()) || PyTuple_CheckExact(obj.ptr())) {
    std::vector<int32_t> out;
    if (plain_tokens(obj.ptr(), out)) return out;
  }
  py::array raw = py::array::ensure(obj);
  if (!raw) throw InvalidArgument("tokens must be a one-dimensional sequence of integers");
  if (raw.ndim() != 1)
    throw InvalidArgument("tokens must be one-dimensional, got " + std::to_string(raw.ndim()) + " dimensions");
  const char kind = raw.dtype().kind();
  if (raw.size() > 0 && kind != 'i' && kind != 'u')
    throw InvalidArgument("token ids must be integers in [0, 2^31), got dtype " +
                          py::str(raw.dtype()).cast<std::string>());
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(raw);
  if (!a) throw InvalidArgument("tokens must be a one-dimensional sequence of integers");
  std::vector<int32_t> out(static_cast<size_t>(a.shape(0)));
  const int64_t* p = a.data();
  for (size_t i = 0; i < out.size(); ++i) {
    if (p[i] < 0 || p[i] > std::numeric_limits<int32_t>::max())
      throw InvalidArgument("token id " + std::to_string(p[i]) + " at position " + std::to_string(i) +
                            " is out of range [0, 2^31)");
    out[i] = static_cast<int32_t>(p[i]);
  }
  return out;
}

// Absolute deadline on the scheduler's clock from a relative timeout or an
// absolute deadline (at most one of them).
double deadline_from(const Scheduler& s, std::optional<double> timeout, std::optional<double> deadline) {
  if (timeout && deadline) throw InvalidArgument("pass timeout or deadline, not both");
  if (timeout) {
    if (std::isnan(*timeout) || *timeout < 0) throw InvalidArgument("timeout must be >= 0");
    return s.clock().now() + *timeout;
  }
  return deadline ? *deadline : Scheduler::kNoDeadline;
}

// Raise OverloadedError(message) with its retry_after_s attribute set.
void set_overloaded(const char* message, double retry_after_s) {
  PyObject* exc = PyObject_CallFunction(g_overloaded, "s", message);
  if (!exc) return;  // the call's own error stands
  PyObject* v = PyFloat_FromDouble(retry_after_s);
  if (v && PyObject_SetAttrString(exc, "retry_after_s", v) == 0) PyErr_SetObject(g_overloaded, exc);
  Py_XDECREF(v);
  Py_DECREF(exc);
}

py::dict summary(const LogHistogram& h) {
  py::dict d;
  d["count"] = h.count();
  d["mean"] = h.mean();
  d["p50"] = h.percentile(0.50);
  d["p95"] = h.percentile(0.95);
  d["p99"] = h.percentile(0.99);
  d["max"] = h.max();
  return d;
}

py::dict stats_dict(const Scheduler::Snapshot& s) {
  const Stats& st = s.stats;
  py::dict d;
  d["submitted"] = st.submitted;
  d["admitted"] = st.submitted;
  d["rejected"] = st.rejected;
  d["refused"] = st.refused;
  d["shed"] = st.shed;
  d["preempted"] = st.preempted;
  d["balanced"] = st.balanced;
  d["completed"] = st.completed;
  d["failed"] = st.failed;
  d["expired"] = st.expired;
  d["cancelled"] = st.cancelled;
  d["closed_unserved"] = st.closed_unserved;
  d["batches"] = st.batches;
  d["failed_batches"] = st.failed_batches;
  d["queue_depth"] = s.depth;
  d["queued_tokens"] = s.queued_tokens;
  d["latency_s"] = summary(st.latency_s);
  d["queue_s"] = summary(st.queue_s);
  d["batch_compute_s"] = summary(st.batch_compute_s);
  d["batch_size"] = summary(st.batch_size);
  d["batch_tokens"] = summary(st.batch_tokens);
  d["real_tokens"] = st.real_tokens;
  d["padded_tokens"] = st.padded_tokens;
  d["padding_ratio"] =
      st.padded_tokens ? 1.0 - static_cast<double>(st.real_tokens) / st.padded_tokens : 0.0;
  const double span = st.last_complete_at - st.first_submit_at;
  d["throughput_rps"] = span > 0 ? st.completed / span : 0.0;
  d["throughput_tokens_per_s"] = span > 0 ? st.real_tokens / span : 0.0;
  py::dict ctl;
  ctl["policy"] = s.policy;
  ctl["budget_tokens"] = s.budget;
  for (const auto& [k, v] : s.controller) ctl[k.c_str()] = v;
  d["controller"] = ctl;
  // One entry per worker (replica), worker 0 first: the same keys as "controller".
  py::list per_worker;
  for (size_t w = 0; w < s.controllers.size(); ++w) {
    py::dict c;
    c["policy"] = s.policy;
    c["budget_tokens"] = s.budgets[w];
    for (const auto& [k, v] : s.controllers[w]) c[k.c_str()] = v;
    per_worker.append(c);
  }
  d["controllers"] = per_worker;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastserve's C++ core: request queue, batch assembly, adaptive controller.";

  g_base_error = new_exception(m, "FastServeError", PyExc_Exception, "Base of fastserve's errors.");
  g_queue_full = new_exception(m, "QueueFullError", g_base_error,
                               "The engine's queue is at capacity (requests or tokens); retry later.");
  g_overloaded = new_exception(
      m, "OverloadedError", g_queue_full,
      "The request was predicted to miss its deadline: the work queued ahead of it, at the measured "
      "throughput, takes too long. retry_after_s: seconds after which that backlog has drained "
      "enough (an HTTP server answers 429 with Retry-After).");
  {
    py::tuple bases = py::make_tuple(py::handle(g_base_error), py::handle(PyExc_RuntimeError));
    g_closed = new_exception(m, "EngineClosedError", bases.ptr(),
                             "The engine was closed before the request could be served.");
  }
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Overloaded& e) {
      set_overloaded(e.what(), e.retry_after_s());
    } catch (const QueueFull& e) {
      PyErr_SetString(g_queue_full, e.what());
    } catch (const SchedulerClosed& e) {
      PyErr_SetString(g_closed, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("bucket_floor", &bucket_floor, py::arg("tokens"),
        "The largest bucket of shapes.py's token ladder at or below tokens (tokens itself below 16).");
  m.def("cuda_compiled", &cuda_compiled, "True when the extension was built with CUDA.");
  m.def("cuda_device_count", &cuda_device_count, py::call_guard<py::gil_scoped_release>(),
        "Visible CUDA devices (0 without a driver or GPU, or without CUDA compiled in).");
  m.def("cuda_runtime_version", &cuda_runtime_version);
  register_kernels(m);

  py::class_<ManualClock, std::shared_ptr<ManualClock>>(m, "ManualClock",
                                                        "A clock that moves only when told to (tests, simulations).")
      .def(py::init<double>(), py::arg("start") = 0.0)
      .def("now", &ManualClock::now)
      .def("set", &ManualClock::set, py::arg("t"))
      .def("advance", &ManualClock::advance, py::arg("dt"));

  py::class_<ControllerConfig>(m, "ControllerConfig")
      .def(py::init(&config_from_kwargs<ControllerConfig>))
      .def_readwrite("policy", &ControllerConfig::policy)
      .def_readwrite("target_latency_s", &ControllerConfig::target_latency_s)
      .def_readwrite("min_tokens", &ControllerConfig::min_tokens)
      .def_readwrite("max_tokens", &ControllerConfig::max_tokens)
      .def_readwrite("initial_tokens", &ControllerConfig::initial_tokens)
      .def_readwrite("aimd_step_tokens", &ControllerConfig::aimd_step_tokens)
      .def_readwrite("aimd_backoff", &ControllerConfig::aimd_backoff)
      .def_readwrite("seed_lambda", &ControllerConfig::seed_lambda)
      .def_readwrite("seed_smoothing", &ControllerConfig::seed_smoothing)
      .def_readwrite("max_step", &ControllerConfig::max_step)
      .def_readwrite("model_headroom", &ControllerConfig::model_headroom)
      .def_readwrite("fit_forgetting", &ControllerConfig::fit_forgetting)
      .def_readwrite("model_load_margin", &ControllerConfig::model_load_margin)
      .def("validate", &ControllerConfig::validate);

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init(&config_from_kwargs<SchedulerConfig>))
      .def_readwrite("max_queue_requests", &SchedulerConfig::max_queue_requests)
      .def_readwrite("max_queue_tokens", &SchedulerConfig::max_queue_tokens)
      .def_readwrite("max_batch_size", &SchedulerConfig::max_batch_size)
      .def_readwrite("max_request_tokens", &SchedulerConfig::max_request_tokens)
      .def_readwrite("pad_token_id", &SchedulerConfig::pad_token_id)
      .def_readwrite("aging_s", &SchedulerConfig::aging_s)
      .def_readwrite("lookahead", &SchedulerConfig::lookahead)
      .def_readwrite("min_fill", &SchedulerConfig::min_fill)
      .def_readwrite("admission", &SchedulerConfig::admission)
      .def_readwrite("attention_tokens", &SchedulerConfig::attention_tokens)
      .def_readwrite("long_apart_tokens", &SchedulerConfig::long_apart_tokens)
      .def_readwrite("extend_past_budget", &SchedulerConfig::extend_past_budget)
      .def_readwrite("token_buckets", &SchedulerConfig::token_buckets)
      .def_readwrite("balance_workers", &SchedulerConfig::balance_workers)
      .def_readwrite("preempt_layers", &SchedulerConfig::preempt_layers)
      .def_property(
          "cost", [](const SchedulerConfig& c) { return std::string(to_string(c.cost)); },
          [](SchedulerConfig& c, const std::string& s) { c.cost = cost_from_string(s); })
      .def("validate", &SchedulerConfig::validate);

  py::class_<Controller>(m, "Controller", "A batch-size controller on its own (simulations, tests).")
      .def(py::init([](const ControllerConfig& c) { return make_controller(c); }), py::arg("config"))
      .def_property_readonly("policy", [](const Controller& c) { return std::string(c.name()); })
      .def_property_readonly("budget", &Controller::budget)
      .def(
          "observe",
          [](Controller& c, int64_t tokens, double latency_s, int64_t budget, int64_t batch_size,
             double now, int64_t queue_depth, double arrival_tokens_per_s, double queued_tokens) {
            if (!(latency_s >= 0) || !std::isfinite(latency_s))
              throw InvalidArgument("controller: latency_s must be finite and >= 0");
            Observation o;
            o.tokens = tokens;
            o.latency_s = latency_s;
            o.budget = budget > 0 ? budget : c.budget();
            o.batch_size = batch_size;
            o.now = now;
            o.queue_depth = queue_depth;
            o.arrival_tokens_per_s = arrival_tokens_per_s;
            o.queued_tokens = queued_tokens;
            c.observe(o);
          },
          py::arg("tokens"), py::arg("latency_s"), py::arg("budget") = 0, py::arg("batch_size") = 1,
          py::arg("now") = 0.0, py::arg("queue_depth") = 0, py::arg("arrival_tokens_per_s") = 0.0,
          py::arg("queued_tokens") = 0.0)
      .def("state", &Controller::state);

  py::class_<Batch, std::shared_ptr<Batch>>(m, "Batch", "Requests assembled for one model call.")
      .def_property_readonly("seq", &Batch::seq)
      .def_property_readonly("worker", [](const Batch& b) { return b.worker; },
                             "The worker (replica) whose controller sized this batch.")
      .def_property_readonly("size", &Batch::size)
      .def("__len__", &Batch::size)
      .def_property_readonly("ids", [](py::object self) { return view(self.cast<Batch&>().ids(), {self.cast<Batch&>().size()}, self); })
      .def_property_readonly("lengths", [](py::object self) { return view(self.cast<Batch&>().lengths(), {self.cast<Batch&>().size()}, self); })
      .def_property_readonly("arrivals", [](py::object self) { return view(self.cast<Batch&>().arrivals(), {self.cast<Batch&>().size()}, self); },
                             "Arrival time of each request [B] float64, on the scheduler's clock.")
      .def_property_readonly("expired", [](const Batch& b) { return b.expired; })
      .def_property_readonly("shed", [](const Batch& b) { return b.shed; })
      .def_property_readonly("abandoned", [](const Batch& b) { return b.abandoned; })
      .def_property_readonly("shed_retry_after_s", [](const Batch& b) { return b.shed_retry_after_s; })
      .def_property_readonly("deadlines", [](py::object self) { return view(self.cast<Batch&>().deadlines(), {self.cast<Batch&>().size()}, self); },
                             "Deadline of each request [B] float64 (inf: none), on the scheduler's clock.")
      .def_property_readonly("total_tokens", &Batch::total_tokens)
      .def_property_readonly("padded_tokens", &Batch::padded_tokens)
      .def_property_readonly("max_seqlen", &Batch::max_len)
      .def_property_readonly("padding_ratio", &Batch::padding_ratio)
      .def_property_readonly("budget", &Batch::budget)
      .def_property_readonly("assembled_at", &Batch::assembled_at)
      .def_property_readonly("input_ids", [](py::object self) {
        auto& b = self.cast<Batch&>();
        const PaddedLayout* p;
        { py::gil_scoped_release r; p = &b.padded(); }
        return view(p->input_ids, {p->batch, p->max_len}, self);
      }, "Padded token ids [B, L] int64 (zero-copy).")
      .def_property_readonly("attention_mask", [](py::object self) {
        auto& b = self.cast<Batch&>();
        const PaddedLayout* p;
        { py::gil_scoped_release r; p = &b.padded(); }
        return view(p->attention_mask, {p->batch, p->max_len}, self);
      }, "Padded attention mask [B, L] int64 (zero-copy).")
      .def_property_readonly("packed_input_ids", [](py::object self) {
        auto& b = self.cast<Batch&>();
        const PackedLayout* p;
        { py::gil_scoped_release r; p = &b.packed(); }
        return view(p->input_ids, {p->total_tokens}, self);
      }, "Packed token ids [T] int64 (zero-copy).")
      .def_property_readonly("position_ids", [](py::object self) {
        auto& b = self.cast<Batch&>();
        const PackedLayout* p;
        { py::gil_scoped_release r; p = &b.packed(); }
        return view(p->position_ids, {p->total_tokens}, self);
      }, "Packed position ids [T] int64, restarting at 0 per sequence (zero-copy).")
      .def_property_readonly("cu_seqlens", [](py::object self) {
        auto& b = self.cast<Batch&>();
        const PackedLayout* p;
        { py::gil_scoped_release r; p = &b.packed(); }
        return view(p->cu_seqlens, {b.size() + 1}, self);
      }, "Cumulative sequence lengths [B + 1] int32 (zero-copy).");

  py::class_<Scheduler>(m, "Scheduler", "Thread-safe request queue with adaptive batch assembly.")
      .def(py::init([](const SchedulerConfig& s, const ControllerConfig& c,
                       std::shared_ptr<ManualClock> clock, int workers) {
             std::shared_ptr<Clock> clk = clock ? std::shared_ptr<Clock>(clock) : steady_clock();
             return std::make_unique<Scheduler>(s, c, clk, workers);
           }),
           py::arg("config") = SchedulerConfig(), py::arg("controller") = ControllerConfig(),
           py::arg("clock") = nullptr, py::arg("workers") = 1)
      .def(
          "submit",
          [](Scheduler& s, const py::object& tokens, int priority, std::optional<double> timeout, std::optional<double> deadline) {
            std::vector<int32_t> t = tokens_from(tokens);
            const double d = deadline_from(s, timeout, deadline);
            // The GIL stays held: the call is a short critical section
            // (docs/design.md, "GIL"), and a release would make the caller
            // queue for the GIL again while it holds the engine's submit lock,
            // which the worker waits on. (Safe: no thread holding the
            // scheduler's mutex waits for the GIL.)
            return s.submit(std::move(t), priority, d);
          },
          py::arg("tokens"), py::arg("priority") = 0, py::arg("timeout") = py::none(),
          py::arg("deadline") = py::none())
      .def(
          "submit_many",
          [](Scheduler& s, const py::iterable& requests, int priority, std::optional<double> timeout,
             std::optional<double> deadline, bool whole, bool waiting) {
            std::vector<std::vector<int32_t>> all;
            size_t i = 0;
            for (const py::handle& tokens : requests) {
              try {
                all.push_back(tokens_from(py::reinterpret_borrow<py::object>(tokens)));
              } catch (const InvalidArgument& e) {
                throw InvalidArgument("request " + std::to_string(i) + ": " + e.what());
              }
              ++i;
            }
            const double d = deadline_from(s, timeout, deadline);
            return s.submit_many(std::move(all), priority, d, whole, waiting);  // GIL held, as in submit
          },
          py::arg("requests"), py::arg("priority") = 0, py::arg("timeout") = py::none(),
          py::arg("deadline") = py::none(), py::arg("whole") = false, py::arg("waiting") = false,
          "Queue several requests under one lock, as many as fit, in order; returns the accepted "
          "prefix's ids. Raises QueueFullError when not even the first fits. whole=True: all or none "
          "(QueueFullError, or OverloadedError when the last is predicted late; ValueError when "
          "they exceed the queue's bounds). waiting=True: an empty list instead of a refusal, uncounted "
          "(a caller with part of its list queued, waiting for room).")
      .def("cancel", &Scheduler::cancel, py::arg("id"))  // GIL held, as in submit
      .def(
          "next_batch",
          [](Scheduler& s, double timeout, int worker) -> std::shared_ptr<Batch> {
            std::optional<std::shared_ptr<Batch>> b;
            {
              py::gil_scoped_release r;
              b = s.next_batch(timeout, worker);
            }
            return b ? *b : nullptr;
          },
          py::arg("timeout"), py::arg("worker") = 0)
      .def(
          "preempt",
          [](Scheduler& s, Batch& running, double done) -> std::shared_ptr<Batch> {
            std::optional<std::shared_ptr<Batch>> b;
            {
              py::gil_scoped_release r;
              b = s.preempt(running, done);
            }
            return b ? *b : nullptr;
          },
          py::arg("running"), py::arg("done"),
          "Between two layers of the running batch (done: the fraction of its layers run): a batch "
          "of urgent requests to run before resuming it, or None. Its `shed` lists the running batch's "
          "rows dropped (lower priority the pause makes late), also in running.abandoned.")
      .def("start", &Scheduler::start, py::arg("batch"), py::arg("cancelled") = std::vector<uint64_t>{},
           py::call_guard<py::gil_scoped_release>(),
           "Call just before running the batch: removes and returns the ids whose deadline has passed, "
           "and removes `cancelled` (ids cancelled since assembly; counted as cancelled).")
      .def("predict_completion", &Scheduler::predict_completion, py::arg("tokens"), py::arg("priority") = 0,
           "Predicted completion time (scheduler clock) of a request submitted now; inf before any "
           "batch is measured or with admission off.")
      .def("complete", &Scheduler::complete, py::arg("batch"), py::arg("compute_seconds"),
           py::arg("extra_tokens") = 0, py::call_guard<py::gil_scoped_release>())
      .def("fail", &Scheduler::fail, py::arg("batch"), py::call_guard<py::gil_scoped_release>())
      .def("close", &Scheduler::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &Scheduler::closed)
      .def_property_readonly("depth", &Scheduler::depth)
      .def_property_readonly("queued_tokens", &Scheduler::queued_tokens)
      .def_property_readonly("budget", py::overload_cast<>(&Scheduler::budget, py::const_))
      .def("budget_of", py::overload_cast<int>(&Scheduler::budget, py::const_), py::arg("worker"),
           "The token budget of worker `worker`'s controller.")
      .def_property_readonly("workers", &Scheduler::workers)
      .def("retire", &Scheduler::retire, py::arg("worker"),
           "Mark a worker dead: admission and the queue's split count only the live ones.")
      .def_property_readonly("live_workers", &Scheduler::live_workers)
      .def("now", [](const Scheduler& s) { return s.clock().now(); })
      .def("stats", [](const Scheduler& s) {
        Scheduler::Snapshot snap;
        {
          py::gil_scoped_release r;
          snap = s.snapshot();
        }
        return stats_dict(snap);
      });
}
