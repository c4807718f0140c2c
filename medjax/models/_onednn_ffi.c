/* oneDNN's convolutions for XLA without Python in the call: medjax.models.onednn's fast path.
 *
 * medjax.models.onednn builds every oneDNN primitive, its memory objects and its packed
 * arguments in Python (ctypes), and hands them here once (medjax_onednn_add). XLA then calls
 * medjax_onednn_handler, an XLA FFI handler in C, which sets the buffers' addresses, runs the
 * primitive and waits, under one lock, as the Python handler does, without taking the GIL. A
 * chain of tiny convolutions takes 2 us a call here against 11 through the Python handler, whose
 * own work took 80-190 us a call inside a step (Vox2Vox's). A call whose primitive was never
 * handed over goes to the Python handler (medjax_onednn_init's `fallback`), which runs it.
 *
 * No headers beyond libc: the XLA FFI structures below are the fields of jaxlib 0.10's
 * xla/ffi/api/c_api.h (API version 0.3) that this handler reads, as medjax/ffi.py declares
 * them for ctypes, and oneDNN's functions arrive as addresses from the loaded library. A plain
 * shared library (no Python API), loaded with ctypes; built by setup.py where a C compiler
 * exists, and without it medjax runs the same primitives from Python.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, posix_memalign */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Python refuses a library built from another version of this file. */
#define MEDJAX_ONEDNN_ABI 1
int medjax_onednn_abi(void) { return MEDJAX_ONEDNN_ABI; }

/* ---- XLA FFI (c_api.h, API 0.3) ---------------------------------------------------------- */

typedef struct Ext {
  size_t struct_size;
  int type;
  struct Ext* next;
} Ext;

typedef struct {
  size_t struct_size;
  void* extension_start;
  int major;
  int minor;
} ApiVersion;

typedef struct {
  size_t struct_size;
  ApiVersion api_version;
  uint32_t traits;
} Metadata;

typedef struct {
  Ext base;
  Metadata* metadata;
} MetadataExt;

typedef struct {
  size_t struct_size;
  void* extension_start;
  int dtype;
  void* data;
  int64_t rank;
  int64_t* dims;
} Buffer;

typedef struct {
  size_t struct_size;
  void* extension_start;
  int64_t size;
  int* types;
  void** items;
} List;

typedef struct {
  size_t struct_size;
  void* extension_start;
  int64_t size;
  int* types;
  void** names;
  void** attrs;
} Attrs;

typedef struct {
  int dtype;
  void* value;
} Scalar;

typedef struct {
  size_t struct_size;
  void* extension_start;
  const char* message;
  int errc;
} ErrorArgs;

typedef void* (*ErrorCreate)(ErrorArgs*);

typedef struct {
  size_t struct_size;
  void* extension_start;
  ApiVersion api_version;
  void* internal_api;
  ErrorCreate error_create;
} Api;

typedef struct {
  size_t struct_size;
  Ext* extension_start;
  const Api* api;
  void* ctx;
  int stage;
  List args;
  List rets;
  Attrs attrs;
  void* future;
} CallFrame;

enum { EXTENSION_METADATA = 1, STAGE_EXECUTE = 3, ERROR_INTERNAL = 13 };

/* ---- oneDNN (its C API, passed in as addresses) ------------------------------------------ */

typedef int (*SetHandle)(void* memory, void* handle);
typedef int (*Execute)(void* primitive, void* stream, int nargs, const void* args);
typedef int (*StreamWait)(void* stream);
typedef int (*StreamCreate)(void** stream, void* engine, unsigned flags);

static SetHandle set_handle;
static Execute execute;
static StreamWait stream_wait;
static StreamCreate stream_create;
static void* engine;
static unsigned stream_flags;
typedef void* (*Handler)(CallFrame*);
static Handler fallback; /* the Python handler, for primitives not handed over yet */

enum { MAX_INNER = 8, MAX_STEPS = 4, ALIGN = 4096 };

typedef struct {
  void* users[3]; /* memory objects of (input, kernel, output) */
  int n_inner;
  void* inner[MAX_INNER]; /* reorder buffers and the scratchpad, at offsets into `scratch` */
  size_t offset[MAX_INNER];
  size_t scratch_need;
  uint64_t generation; /* of `scratch` when `inner` was last pointed into it */
  int n_steps;
  void* primitive[MAX_STEPS];
  int nargs[MAX_STEPS];
  const void* args[MAX_STEPS]; /* dnnl_exec_arg_t arrays, kept alive by Python */
} Plan;

typedef struct {
  Plan* plan;
  int operand[2]; /* which of (input, kernel, output) XLA's two operands are */
  int result;
} Binding;

static pthread_mutex_t running = PTHREAD_MUTEX_INITIALIZER; /* one primitive at a time */
static pthread_mutex_t tables = PTHREAD_MUTEX_INITIALIZER;
static Binding* bindings;
static int64_t n_bindings;
static void* scratch;
static size_t scratch_size;
static uint64_t scratch_generation;
static __thread void* stream;

/* benchmarks/breakdown.py's view of the calls: with `skipping` set they return at once (XLA's
 * part of a step alone); with a record set, each call's plan, thread and times (seconds of
 * CLOCK_MONOTONIC, Python's time.perf_counter) are written there until it is full. */
typedef struct {
  void* plan;
  uint64_t thread;
  double called, began, ended; /* the lock taken between called and began */
} Call;

static volatile int skipping;
static Call* record;
static int64_t record_capacity;
static int64_t recorded; /* written under `running` */

void medjax_onednn_skip(int on) { skipping = on; }

/* Records the calls into `calls` (capacity `n`; NULL: stop); returns how many it recorded
 * since the last call. */
int64_t medjax_onednn_record(Call* calls, int64_t n) {
  pthread_mutex_lock(&running);
  int64_t count = recorded;
  record = calls;
  record_capacity = n;
  recorded = 0;
  pthread_mutex_unlock(&running);
  return count;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int medjax_onednn_init(void* engine_, unsigned stream_flags_, void* set_handle_, void* execute_,
                       void* stream_wait_, void* stream_create_, void* fallback_) {
  engine = engine_;
  stream_flags = stream_flags_;
  set_handle = (SetHandle)set_handle_;
  execute = (Execute)execute_;
  stream_wait = (StreamWait)stream_wait_;
  stream_create = (StreamCreate)stream_create_;
  fallback = (Handler)fallback_;
  return 0;
}

/* A primitive with its memory objects and packed arguments; the returned pointer is its
 * handle (never freed: Python keeps the objects it points at alive as long as the process). */
void* medjax_onednn_add(void* const* users, int n_inner, void* const* inner,
                        const size_t* offset, size_t scratch_need, int n_steps,
                        void* const* primitive, const int* nargs, const void* const* args) {
  if (n_inner > MAX_INNER || n_steps > MAX_STEPS) return NULL;
  Plan* p = calloc(1, sizeof(Plan));
  if (p == NULL) return NULL;
  memcpy(p->users, users, sizeof(p->users));
  p->n_inner = n_inner;
  for (int i = 0; i < n_inner; ++i) {
    p->inner[i] = inner[i];
    p->offset[i] = offset[i];
  }
  p->scratch_need = scratch_need;
  p->generation = UINT64_MAX; /* never pointed into `scratch` yet */
  p->n_steps = n_steps;
  for (int i = 0; i < n_steps; ++i) {
    p->primitive[i] = primitive[i];
    p->nargs[i] = nargs[i];
    p->args[i] = args[i];
  }
  return p;
}

/* XLA's calls with attribute plan = `id` run `plan`, their operands and result being the
 * convolution's arrays number operand0, operand1 and result (0 input, 1 kernel, 2 output). */
int medjax_onednn_bind(int64_t id, void* plan, int operand0, int operand1, int result) {
  if (id < 0 || plan == NULL) return 1;
  pthread_mutex_lock(&tables);
  if (id >= n_bindings) {
    int64_t n = id + 64;
    Binding* grown = realloc(bindings, (size_t)n * sizeof(Binding));
    if (grown == NULL) {
      pthread_mutex_unlock(&tables);
      return 1;
    }
    memset(grown + n_bindings, 0, (size_t)(n - n_bindings) * sizeof(Binding));
    bindings = grown;
    n_bindings = n;
  }
  bindings[id] = (Binding){plan, {operand0, operand1}, result};
  pthread_mutex_unlock(&tables);
  return 0;
}

void medjax_onednn_lock(void) { pthread_mutex_lock(&running); }
void medjax_onednn_unlock(void) { pthread_mutex_unlock(&running); }

/* The scratch memory that every plan's reorders and scratchpad share, grown to at least
 * `need` bytes (its generation then changes), or NULL when memory ran out; its size and
 * generation go to `size` and `generation`. The caller holds the lock: no primitive is using
 * the old memory when it goes. */
void* medjax_onednn_scratch(size_t need, size_t* size, uint64_t* generation) {
  if (need > scratch_size) {
    size_t bytes = (need + ALIGN - 1) / ALIGN * ALIGN;
    void* grown = NULL;
    if (posix_memalign(&grown, ALIGN, bytes) != 0) return NULL;
    free(scratch);
    scratch = grown;
    scratch_size = bytes;
    ++scratch_generation;
  }
  if (size != NULL) *size = scratch_size;
  if (generation != NULL) *generation = scratch_generation;
  return scratch;
}

/* The generation of the scratch memory that `plan`'s inner arrays point into. */
uint64_t medjax_onednn_plan_generation(void* plan) { return ((Plan*)plan)->generation; }

/* Runs `plan` on the arrays at pointers[0..2] (input, kernel, output); the caller holds the
 * lock (medjax_onednn_lock). Returns oneDNN's status, or -1 when memory ran out. */
int medjax_onednn_run(void* plan, void* const* pointers) {
  Plan* p = plan;
  int status;
  if (p->scratch_need) {
    if (medjax_onednn_scratch(p->scratch_need, NULL, NULL) == NULL) return -1;
    if (p->generation != scratch_generation) {
      for (int i = 0; i < p->n_inner; ++i)
        if ((status = set_handle(p->inner[i], (char*)scratch + p->offset[i])) != 0) return status;
      p->generation = scratch_generation;
    }
  }
  for (int i = 0; i < 3; ++i)
    if ((status = set_handle(p->users[i], pointers[i])) != 0) return status;
  if (stream == NULL && (status = stream_create(&stream, engine, stream_flags)) != 0) {
    stream = NULL;
    return status;
  }
  for (int i = 0; i < p->n_steps; ++i)
    if ((status = execute(p->primitive[i], stream, p->nargs[i], p->args[i])) != 0) return status;
  return stream_wait(stream);
}

static void* error(const CallFrame* frame, const char* message) {
  ErrorArgs args = {sizeof(ErrorArgs), NULL, message, ERROR_INTERNAL};
  return frame->api->error_create(&args);
}

void* medjax_onednn_handler(CallFrame* frame) {
  if (frame->extension_start != NULL && frame->extension_start->type == EXTENSION_METADATA) {
    Metadata* meta = ((MetadataExt*)frame->extension_start)->metadata;
    meta->api_version = (ApiVersion){sizeof(ApiVersion), NULL, 0, 3};
    meta->traits = 0;
    return NULL;
  }
  if (frame->stage != STAGE_EXECUTE) return NULL;
  int64_t id = *(int64_t*)((Scalar*)frame->attrs.attrs[0])->value;
  Binding b = {NULL, {0, 0}, 0};
  pthread_mutex_lock(&tables);
  if (id >= 0 && id < n_bindings) b = bindings[id];
  pthread_mutex_unlock(&tables);
  if (b.plan == NULL) return fallback(frame);
  void* pointers[3] = {NULL, NULL, NULL};
  pointers[b.operand[0]] = ((Buffer*)frame->args.items[0])->data;
  pointers[b.operand[1]] = ((Buffer*)frame->args.items[1])->data;
  pointers[b.result] = ((Buffer*)frame->rets.items[0])->data;
  if (skipping) return NULL;
  double called = record != NULL ? now() : 0.0;
  pthread_mutex_lock(&running);
  int status;
  if (record == NULL) {
    status = medjax_onednn_run(b.plan, pointers);
  } else {
    double began = now();
    status = medjax_onednn_run(b.plan, pointers);
    if (recorded < record_capacity)
      record[recorded++] = (Call){b.plan, (uint64_t)pthread_self(), called, began, now()};
  }
  pthread_mutex_unlock(&running);
  if (status == 0) return NULL;
  char message[128];
  snprintf(message, sizeof(message),
           "medjax.models.onednn: oneDNN failed running a convolution (dnnl_status_t %d)",
           status);
  return error(frame, message);
}
