/* A stand-in for libpcaudio.so.0, which libespeak-ng links for audio playback. The corpus synthesises in
 * espeak-ng's synchronous mode and never plays audio, so every call fails politely. Only for machines without
 * PulseAudio (the lent GPU machines): gcc -shared -fPIC -o libpcaudio.so.0 pcaudio_stub.c */
#include <stddef.h>

struct audio_object;

struct audio_object *create_audio_device_object(const char *device, const char *application_name,
                                                const char *description) {
    (void)device; (void)application_name; (void)description;
    return NULL;
}
int audio_object_open(struct audio_object *object, int format, unsigned int rate, unsigned char channels) {
    (void)object; (void)format; (void)rate; (void)channels;
    return -1;
}
void audio_object_close(struct audio_object *object) { (void)object; }
void audio_object_destroy(struct audio_object *object) { (void)object; }
int audio_object_write(struct audio_object *object, const void *data, size_t bytes) {
    (void)object; (void)data; (void)bytes;
    return -1;
}
int audio_object_drain(struct audio_object *object) { (void)object; return 0; }
int audio_object_flush(struct audio_object *object) { (void)object; return 0; }
const char *audio_object_strerror(struct audio_object *object, int error) {
    (void)object; (void)error;
    return "no audio output (stub)";
}
