/* The structs llamaprobe reads, from a fixture's own llama.h, compiled with -g: `llamaprobe
 * layout` compares their DWARF with the catalog's layout rows (agent/tests/it/matrix.rs). */
#include "llama.h"

struct llama_batch layout_probe_batch;
struct llama_context_params layout_probe_context_params;

int main(void) {
    return (int)(sizeof layout_probe_batch + sizeof layout_probe_context_params) & 1;
}
