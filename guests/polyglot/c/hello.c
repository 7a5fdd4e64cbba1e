/* The SDK's hello in C, as a WASI preview 1 command: reads {"name": "..."} from stdin (the
 * request body) and writes {"greeting": "Hello, ...!"} on stdout (the response). No JSON library:
 * it looks for the "name" key's string value, which is all this example needs. A body without a
 * name is an error: the message on stderr and exit code 1, so Kiln reports function_failed.
 * Build: guests/polyglot/build.sh (zig cc -target wasm32-wasi). */
#include <stdio.h>
#include <string.h>

static char input[65536];

int main(void) {
    size_t len = fread(input, 1, sizeof input - 1, stdin);
    input[len] = '\0';
    char *key = strstr(input, "\"name\"");
    char *start = key ? strchr(key + 6, '"') : NULL;
    char *end = start ? strchr(start + 1, '"') : NULL;
    if (!end || end == start + 1) {
        fprintf(stderr, "hello: send {\"name\": \"...\"}\n");
        return 1;
    }
    *end = '\0';
    printf("{\"greeting\":\"Hello, %s!\"}", start + 1);
    return 0;
}
