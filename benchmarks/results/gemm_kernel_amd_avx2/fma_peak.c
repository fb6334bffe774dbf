// One core's float32 FMA peak: twelve independent 8-lane FMA chains.
//   gcc -O2 -mavx2 -mfma fma_peak.c -o fma_peak && ./fma_peak
// benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){
  __m256 a[12]; __m256 b=_mm256_set1_ps(1.0000001f), c=_mm256_set1_ps(1e-9f);
  for(int i=0;i<12;i++) a[i]=_mm256_set1_ps(i);
  long n=400000000/12*4;
  struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
  for(long k=0;k<n/12;k++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm256_fmadd_ps(a[i],b,c);
  }
  clock_gettime(CLOCK_MONOTONIC,&t1);
  double s=(t1.tv_sec-t0.tv_sec)+1e-9*(t1.tv_nsec-t0.tv_nsec);
  float sum=0; for(int i=0;i<12;i++){float t[8];_mm256_storeu_ps(t,a[i]);sum+=t[0];}
  printf("%.1f GFLOP/s (sum %g)\n", (double)(n/12)*12*16/s/1e9, sum);
}
