/* The X-Slot buffer type's answers to what ggml asks while it schedules a graph (inside
 * llama_decode): its name, its alignment, and whether its memory is the host's. Answered in C, so
 * that a decode whose gate asks for nothing (a budget that holds every leaf, once they are all in)
 * enters no Python: no GIL to take, and no signal handler that could run inside a callback.
 *
 * The buffer type's context points at a struct smoe_buft_answers that xslot.py keeps and updates
 * (is_host turns true when loading ends); where the context sits in ggml's struct
 * ggml_backend_buffer_type is given once by ggml_abi.py (smoe_buft_set_context_offset).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct smoe_buft_answers {
    const char *name;
    uint64_t alignment;
    int32_t is_host;
};

static ptrdiff_t context_offset = -1;

size_t smoe_buft_answers_sizeof(void) { return sizeof(struct smoe_buft_answers); }

void smoe_buft_set_context_offset(int64_t offset) { context_offset = (ptrdiff_t)offset; }

static const struct smoe_buft_answers *answers(const void *buft) {
    return *(struct smoe_buft_answers *const *)((const char *)buft + context_offset);
}

const char *smoe_buft_get_name(const void *buft) { return answers(buft)->name; }

size_t smoe_buft_get_alignment(const void *buft) { return (size_t)answers(buft)->alignment; }

bool smoe_buft_is_host(const void *buft) { return __atomic_load_n(&answers(buft)->is_host, __ATOMIC_ACQUIRE) != 0; }
